"""qiao.compiler.kernels"""
