"""qiao.compiler.passes"""
