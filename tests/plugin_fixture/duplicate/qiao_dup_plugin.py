"""Claims the name ``cpu``, which qiao's own CPU backend holds; discovery must reject it."""

from qiao.backends.cpu import CPUBackend


class OtherCPU(CPUBackend):
    vendor = "an impostor"
