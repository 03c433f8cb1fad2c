"""The backend interface: what every qiao target implements.

A backend turns an imported model (a Relax module plus its weights) into files in an artifact
directory, and, where its device is present, loads and runs those files. Read this file once and you
can write one: the abstract methods are ``presets``, ``availability``, ``target``, ``build`` and
``load``; the per-target lowering phases, the MoE schedule parameters and the post-write check have
defaults you override when your target needs to. Backends whose vendor compiler consumes ONNX itself
set ``imports_relax = False``."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from qiao.compiler.errors import UnknownTarget
from qiao.compiler.pipeline import Phase  # the lowering library defines phases; backends fill them

if TYPE_CHECKING:  # pragma: no cover
    from qiao.compiler.frontend import ImportedModel


@dataclass(frozen=True)
class DevicePreset:
    """A named device of a backend (``sm_90``, ``gfx942``, ``Ascend910B``...).

    Parameters
    ----------
    name : str
        What users pass as ``--arch``.
    description : str
        Human name of the chips, e.g. ``"NVIDIA H100 / H200 (Hopper)"``.
    target : dict
        The TVM target as a dict (``{"kind": "cuda", "arch": "sm_90"}``), or the vendor's target
        description for hand-off backends (``{"soc_version": "Ascend910B"}``).

    Presets are frozen: change one with ``replace``.
    """

    name: str
    description: str
    target: Mapping[str, Any]

    def replace(self, **changes) -> DevicePreset:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Availability:
    """What a backend can do on this machine. ``missing`` says what to install for the rest."""

    can_compile: bool
    can_run: bool
    missing: tuple[str, ...] = ()
    handoff_only: bool = False  # a hand-off backend whose vendor compiler is absent: package only

    @property
    def status(self) -> str:
        if self.can_compile and self.can_run:
            return "ready"
        if self.handoff_only:
            return "toolchain missing (writes the hand-off package only): " + "; ".join(
                self.missing
            )
        if self.can_compile:
            return "compiles only (no device)" + (
                f": {'; '.join(self.missing)}" if self.missing else ""
            )
        return "toolchain missing: " + "; ".join(self.missing or ("unknown",))


class Runner(abc.ABC):
    """A loaded artifact on its device. ``run`` takes and returns numpy arrays in manifest order."""

    @abc.abstractmethod
    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run once on already-checked inputs; returns the outputs in manifest order."""

    def prepare(self, inputs: Sequence[np.ndarray]) -> Callable[[], Any]:
        """A callable running the model once on already-checked ``inputs``, for timing loops:
        work that need not repeat (copies to the device...) is done here. The default calls
        ``run``."""
        return lambda: self.run(inputs)

    # Device-resident calls: a caller that keeps state on the device between calls (a decoder's
    # KV cache) passes the device's own tensors and gets them back, with no host round trip.
    # The defaults are the host: numpy arrays in and out.
    def to_device(self, array: np.ndarray) -> Any:
        """``array`` as this runner's device tensor."""
        return np.ascontiguousarray(array)

    def empty(self, shape: Sequence[int], dtype: str) -> Any:
        """A zero-filled device tensor."""
        return np.zeros(tuple(shape), dtype)

    def to_host(self, tensor: Any) -> np.ndarray:
        """A device tensor (a ``call`` output) as a numpy array."""
        return np.asarray(tensor)

    def call(self, inputs: Sequence[Any]) -> list[Any]:
        """Run once on device tensors (``to_device``/``empty``/earlier outputs) in manifest
        order; returns the outputs as device tensors, synchronised."""
        return self.run([self.to_host(x) for x in inputs])

    def benchmark(self, inputs: Sequence[np.ndarray], repeat: int, number: int) -> list[float]:
        """Seconds per call for ``repeat`` measurements of ``number`` calls each
        (device-synchronised).

        The default times ``run`` from Python; TVM backends override it with TVM's time
        evaluator."""
        import time

        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                self.run(inputs)
            times.append((time.perf_counter() - start) / number)
        return times


class Backend(abc.ABC):
    """Base class of every backend. Subclasses set ``name``, ``vendor`` and ``default_preset``.

    ``imports_relax`` says whether ``build`` receives a Relax module (TVM backends) or only the
    checked ONNX model (``ImportedModel.proto``: hand-off backends, whose vendor compiler reads
    ONNX).
    """

    name: ClassVar[str]
    vendor: ClassVar[str]
    default_preset: ClassVar[str | None] = None
    imports_relax: ClassVar[bool] = True

    # -- what the target is: the one place that says it (compiler/ asks, never switches on kinds)
    #: TVM target kinds this backend compiles for (``("llvm",)``, ``("cuda",)``); empty for a
    #: hand-off backend whose vendor compiler reads ONNX.
    target_kinds: ClassVar[tuple[str, ...]] = ()
    #: TVM runtime device name the artifact runs on (``tvm.device(device_type)``), or ``None``.
    device_type: ClassVar[str | None] = None
    #: TVM runtime libraries (apache-tvm's ``lib/``) that run this backend's artifacts without the
    #: compiler (``qiao pack``); empty when its artifacts cannot be packed.
    runtime_libraries: ClassVar[tuple[str, ...]] = ()
    #: Thread-bound GPU kernels (the MoE lowering's) rather than CPU loop nests.
    is_gpu: ClassVar[bool] = False
    #: Where the baselines (ONNX Runtime, PyTorch) run for comparison: ``"cpu"``, ``"cuda"``,
    #: ``"rocm"``, or ``None`` when neither has this device.
    reference_device: ClassVar[str | None] = None
    #: ONNX Runtime execution providers for ``reference_device``, most preferred first.
    ort_providers: ClassVar[tuple[str, ...]] = ()

    # -- what the backend is -------------------------------------------------------------------
    @abc.abstractmethod
    def presets(self) -> Mapping[str, DevicePreset]:
        """The named devices this backend knows, by ``--arch`` name."""

    @abc.abstractmethod
    def availability(self) -> Availability:
        """What works here. Must never raise: probe, catch, and report what is missing."""

    @abc.abstractmethod
    def target(self, arch: str | None = None) -> Any:
        """The compilation target for ``arch`` (a preset name, or a backend-specific chip name)."""

    # -- what it does --------------------------------------------------------------------------
    @abc.abstractmethod
    def build(
        self, model: ImportedModel, arch: str | None, workdir: str, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Compile ``model`` into files under ``workdir`` (an empty temporary directory).

        Returns the backend's manifest section: at least ``{"library": file name or None}`` plus
        anything ``load`` needs. Raise ``ToolchainMissing`` / ``CompileError`` on failure; the
        caller removes ``workdir``, so a failed build never leaves a partial artifact.
        """

    @abc.abstractmethod
    def load(self, artifact_dir: str, manifest: Mapping[str, Any]) -> Runner:
        """Load a built artifact for running; ``ToolchainMissing`` when the device is absent."""

    # -- defaults a backend may override -------------------------------------------------------
    def after_write(self, artifact_dir: str, manifest: Mapping[str, Any]) -> None:
        """Called once the artifact is in place. The default does nothing.

        Hand-off backends raise ``ToolchainMissing`` here when the vendor compiler could not run:
        the complete hand-off package stays in ``artifact_dir`` (its manifest says ``status:
        handoff-only``) and the CLI still exits 2 with the message naming what to install.
        """
        return None

    def phases(self, target: Any) -> list[Phase]:
        """The lowering phases, in order (see ``qiao.compiler.pipeline``)."""
        from qiao.compiler.pipeline import default_phases

        return default_phases(target, gpu=self.is_gpu, moe_keys=self.tuning_keys(target))

    def tuning_keys(self, target: Any) -> list[str]:
        """This device's keys in qiao's per-device stores (the MoE schedule table), most specific
        first: the MoE lowering looks its schedule up under them, ``qiao tune`` writes under the
        first. The default derives them from the TVM target
        (``qiao.compiler.schedules.moe_table.device_keys``: ``cpu/<mcpu>`` then the SIMD family,
        ``cuda/sm_90`` then ``cuda``); override to key a device otherwise."""
        from qiao.compiler.schedules.moe_table import device_keys

        return device_keys(target)

    def preset(self, arch: str | None) -> DevicePreset | None:
        """The preset named ``arch`` (default preset for ``None``); ``None`` for a raw chip name."""
        name = arch or self.default_preset
        if name is None:
            return None
        return self.presets().get(name)

    def require_preset(self, arch: str | None) -> DevicePreset:
        """Like ``preset`` but raise ``UnknownTarget`` naming the known presets."""
        found = self.preset(arch)
        if found is None:
            known = ", ".join(self.presets())
            raise UnknownTarget(
                f"backend {self.name!r} has no device preset {arch!r}. fix: pass --arch with one "
                "of: "
                f"{known}"
            )
        return found
