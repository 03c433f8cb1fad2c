"""qiao.compiler.schedules"""
