"""ComfyUI's Dynamic VRAM weight path (ModelPatcherDynamic on comfy_aimdo) run in-process on a CPU, for tests.

On an NVIDIA GPU, ComfyUI with Dynamic VRAM (0.30 has it) loads models through
`comfy.model_patcher.ModelPatcherDynamic`: `load` gives each layer a slot (`_v`) in a per-model virtual VRAM
range (comfy_aimdo's `ModelVBAR`) and a LoRA becomes the layer's `weight_lowvram_function`; at forward time
`comfy.ops.cast_bias_weight` faults the slot in, copies the host weight into it through a pinned host buffer
unless the slot is still resident, applies the LoRA (`post_cast`), commits the patched weight into the slot
(`update_weight`), and `uncast_bias_weight` unpins the slot. None of it runs on a CPU:
`ModelPatcherDynamic(...)` returns a plain `ModelPatcher` for a CPU load device and `cast_bias_weight` sends
`_v` layers computing on a CPU to a plain copy. This module runs that code on the CPU, replacing only the
device memory underneath it and the two checks that pick the CPU branches. The emulated GPU is
`torch.device("cpu", 0)`: ComfyUI compares load devices with `torch.device("cpu")`, which it is not, while
tensors allocated on it are CPU tensors.

Replaced inside `emulated_dynamic_vram()` (everything is restored on exit; `REPLACED` says the same):

- `comfy_aimdo.model_vbar.ModelVBAR`: the virtual VRAM range. Its native library needs a GPU. Stand-in
  `CpuVbar` keeps the same interface and behaviour: `alloc` hands out slots, `fault` makes a slot resident
  (fresh memory is filled with 0xFF bytes, NaN in any float dtype, as real fresh VRAM holds garbage),
  pins it and returns a signature that changes whenever the slot lost its content, `unpin`,
  `free_memory` evicts unpinned slots, `loaded_size`; an optional VRAM size makes faults evict unpinned
  slots (least recently faulted first) or fail (signature None) as a full GPU does.
- `comfy_aimdo.torch.aimdo_to_tensor`: a slot as a byte tensor. The real one builds a CUDA tensor from
  the slot's address; the stand-in returns the slot's CPU memory.
- `comfy_aimdo.host_buffer.HostBuffer`: the growable host buffer that pins are cut from (native library).
  Stand-in `CpuHostBuffer` reserves the same maximum size up front (committed by the OS only when written)
  at a fixed address, so comfy_aimdo's real `hostbuf_to_tensor` reads it.
- `torch.cuda.cudart`: `cudaHostRegister` / `cudaHostUnregister` page-lock pins for DMA; CPU-only torch
  has no CUDA runtime. Stand-in `CpuCudart` accepts every call and counts the registered bytes.
- `comfy.model_management.MAX_PINNED_MEMORY`: the pin budget ComfyUI sets at import on NVIDIA/AMD; it
  is -1 without a GPU, which declines every pin. Set to `pinned_memory` (0 keeps pinning off).
- `comfy.model_management.is_device_cpu`: False for the emulated device, so `ModelPatcherDynamic` is not
  rerouted to `ModelPatcher` and `cast_bias_weight` does not take its CPU branch; unchanged otherwise.
- `comfy.ops.cast_bias_weight`: wrapped to pass `device=` the emulated device for a layer with a slot
  that would compute on the real CPU. The compute device is read from the input, a CPU tensor whose
  device always reads `cpu`, the same as the host weight's, and the vbar branch needs them to differ.

Only while `building()` is active, so that ComfyUI builds models as it does on a GPU with Dynamic VRAM:
`comfy.model_management.get_torch_device` returns the emulated device, `comfy.model_patcher.CoreModelPatcher`
is `ModelPatcherDynamic` and `comfy.memory_management.aimdo_enabled` is True (what ComfyUI's main.py sets
when comfy_aimdo initialises; layers then keep the file's dtype and weights are assigned, not copied).

Runs for real: ModelPatcherDynamic (construction, `load` with `setup_param` and `LowVramPatch`,
`partially_load`, `unpatch_model`, `detach`, `partially_unload`, `partially_unload_ram`), `load_models_gpu`
and `free_memory`, the vbar branch of `cast_bias_weight` (`cast_modules_with_vbar`,
`resolve_cast_module_with_vbar` with `post_cast` and the `update_weight` commit, `uncast_bias_weight`),
`comfy.pinned_memory`, and comfy_aimdo's `vbar_fault`, `vbar_unpin`, `vbar_signature_compare`,
`hostbuf_to_tensor`. Not exercised: offload streams and aimdo cast buffers (ComfyUI makes no streams
without a GPU and takes its own no-stream branch: scratch buffers from `torch.empty`), block prefetch
(needs streams), file-backed weights (comfy_aimdo's ModelMMAP and `read_file_slice` are not emulated:
inside `building()` pass state dicts, not paths, to ComfyUI's loaders), residency per 32 MiB page (a
slot is resident or not as a whole), and the compute dtype a GPU would pick (the model keeps the one
ComfyUI chose for a CPU, e.g. float16 weights computed in float32).

Use, in a script run by ComfyUI's Python (with `args.cpu = True`, as the other in-process scripts):

    if (reason := unavailable_reason()) is not None:
        ...  # report "not available" and skip
    with emulated_dynamic_vram() as emu:
        patcher = emu.dynamic(comfy.sd.load_diffusion_model_state_dict(weights))  # or: with emu.building(): load
        patcher = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0]
        comfy.model_management.load_models_gpu([patcher])
        out = patcher.model.apply_model(x, t, c_crossattn=context)
        emu.stats(), emu.slot(layer)  # residency, transfers, pins
    # on exit ComfyUI unloads what is on the emulated device; do not use these patchers afterwards

A layer of one's own takes the vbar branch only if it looks up `comfy.ops.cast_bias_weight` when it
runs (`comfy.ops.cast_bias_weight(...)`, or `from comfy.ops import ...` inside the function), not once
at import. `tests/comfyui_dynamic_vram.py` is the check on ComfyUI's own layers (one JSON line):

    cd ComfyUI && python /path/to/repo/tests/comfyui_dynamic_vram.py
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import itertools
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

EMULATED_DEVICE = torch.device("cpu", 0)
CPU = torch.device("cpu")
SIGNATURE_PAGE = 32 * 1024**2  # comfy_aimdo's page: a signature has one entry per page, plus two

# Each entry: "<the replaced name> -> <what stands in>: <why>".
REPLACED = (
    (
        "comfy_aimdo.model_vbar.ModelVBAR -> CpuVbar: the virtual VRAM range needs comfy_aimdo's native library "
        "and a GPU; slots live in CPU memory with the same alloc / fault (pins, signature) / unpin / free_memory "
        "/ loaded_size behaviour, fresh slot memory is NaN-filled garbage, an optional VRAM size evicts or fails"
    ),
    "comfy_aimdo.torch.aimdo_to_tensor -> the slot's CPU memory: the real one makes a CUDA tensor from an address",
    (
        "comfy_aimdo.host_buffer.HostBuffer -> CpuHostBuffer: pins are cut from it and it needs the native library; "
        "same size / extend / truncate / get_raw_address behaviour on a fixed CPU reservation"
    ),
    (
        "torch.cuda.cudart -> CpuCudart: cudaHostRegister / cudaHostUnregister page-lock pins; CPU-only torch has "
        "no CUDA runtime, so every call succeeds and is counted"
    ),
    (
        "comfy.model_management.MAX_PINNED_MEMORY -> the pinned_memory argument: ComfyUI sets a pin budget only on "
        "NVIDIA/AMD (-1 declines every pin)"
    ),
    (
        "comfy.model_management.is_device_cpu -> False for the emulated device cpu:0, the real answer otherwise: "
        "else ModelPatcherDynamic reroutes to ModelPatcher and cast_bias_weight takes its CPU branch"
    ),
    (
        "comfy.ops.cast_bias_weight -> wrapped to pass device=cpu:0 for a layer with a slot computing on the CPU: "
        "the compute device comes from the input, whose device reads 'cpu' like the host weight's, and the vbar "
        "branch needs the two to differ"
    ),
    (
        "comfy.model_management.get_torch_device -> the emulated device, inside building() only: ComfyUI's loaders "
        "take the load device from it"
    ),
    (
        "comfy.model_patcher.CoreModelPatcher -> ModelPatcherDynamic, inside building() only: what ComfyUI's main.py "
        "sets when comfy_aimdo initialises on a GPU; loaders build their patcher with it"
    ),
    (
        "comfy.memory_management.aimdo_enabled -> True, inside building() only: set by main.py with the above; layers "
        "then keep the file's dtype and weights are assigned, not copied, as on a GPU"
    ),
)


REPLACED_NAMES = tuple(entry.split(" -> ")[0] for entry in REPLACED)
# What the emulation relies on running for real, besides ModelPatcherDynamic itself.
EXERCISED_NAMES = (
    "comfy.ops.cast_modules_with_vbar",
    "comfy.ops.resolve_cast_module_with_vbar",
    "comfy.ops.uncast_bias_weight",
    "comfy.pinned_memory.pin_memory",
    "comfy_aimdo.model_vbar.vbar_fault",
    "comfy_aimdo.model_vbar.vbar_unpin",
    "comfy_aimdo.model_vbar.vbar_signature_compare",
    "comfy_aimdo.torch.hostbuf_to_tensor",
)


def bound(dotted: str):
    """What a dotted module attribute name ("comfy.ops.cast_bias_weight") is bound to now."""
    module_name, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), name)


def unavailable_reason() -> str | None:
    """Why this ComfyUI cannot run the emulation (a sentence for a test skip), or None when it can.

    A feature check, whatever the version number says: ModelPatcherDynamic, every name the emulation
    replaces and every function it relies on must exist.
    """
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "comfy.model_patcher has no ModelPatcherDynamic (this ComfyUI has no Dynamic VRAM)"
    for dotted in REPLACED_NAMES + EXERCISED_NAMES:
        try:
            bound(dotted)
        except (ImportError, AttributeError) as exc:
            return f"{dotted} is missing ({exc}): a Dynamic VRAM this emulation does not know"
    return None


@dataclass
class Slot:
    """One `alloc` of a CpuVbar: a layer's weight and bias in emulated VRAM, with what happened to it."""

    size: int
    memory: torch.Tensor | None = None  # None while not resident
    generation: int = 0  # the signature: new each time the slot becomes resident
    pinned: bool = False
    last_fault: int = 0
    faults: int = 0
    failed_faults: int = 0  # no room: ComfyUI casts through a scratch buffer and commits nothing
    transfers: int = 0  # aimdo_to_tensor calls: ComfyUI copying into the slot (its non-resident path)
    evictions: int = 0

    def evict(self) -> None:
        """Lose the content, as evicted VRAM does: views still held read NaN, not the old weights."""
        self.memory.fill_(0xFF)
        self.memory = None
        self.evictions += 1


class DeviceMemory:
    """The emulated GPU's memory, shared by every CpuVbar of one emulation (as VRAM is by a GPU's vbars)."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.vbars: weakref.WeakSet[CpuVbar] = weakref.WeakSet()  # a vbar lives as long as its model
        self.clock = itertools.count(1)

    def resident_bytes(self) -> int:
        return sum(v.loaded_size() for v in self.vbars)

    def make_room(self, size: int) -> bool:
        """Evict unpinned slots, least recently faulted first, until `size` more bytes fit."""
        if self.size is None:
            return True
        victims = sorted(
            (s for v in self.vbars for s in v.slots.values() if s.memory is not None and not s.pinned),
            key=lambda s: s.last_fault,
        )
        while self.resident_bytes() + size > self.size and victims:
            victims.pop(0).evict()
        return self.resident_bytes() + size <= self.size


class CpuVbar:
    """Stand-in for comfy_aimdo's ModelVBAR: same methods ComfyUI calls, slots in CPU memory."""

    _next_base = itertools.count(1)

    def __init__(self, memory: DeviceMemory, size: int, device: int) -> None:
        self.device_memory = memory
        self.device = device
        self.max_size = int(size)
        self.offset = 0
        self.base_addr = next(self._next_base) << 48  # distinct fake address ranges, never dereferenced
        self.slots: dict[int, Slot] = {}
        memory.vbars.add(self)

    def alloc(self, num_bytes: int) -> tuple[CpuVbar, int, int]:
        self.offset = (self.offset + 511) & ~511
        if self.offset + num_bytes > self.max_size:
            raise MemoryError("VBAR OOM")
        address = self.base_addr + self.offset
        self.offset += num_bytes
        self.slots[address] = Slot(num_bytes)
        return (self, address, num_bytes)

    def fault(self, address: int, size: int):
        slot = self.slots[address]
        if slot.memory is None:
            if not self.device_memory.make_room(size):
                slot.failed_faults += 1
                return None
            slot.memory = torch.full((size,), 0xFF, dtype=torch.uint8)
            slot.generation = next(self.device_memory.clock)
        slot.pinned = True
        slot.faults += 1
        slot.last_fault = next(self.device_memory.clock)
        entries = size // SIGNATURE_PAGE + 2
        return (ctypes.c_uint32 * entries)(*([slot.generation] * entries))

    def unpin(self, address: int, size: int) -> None:
        self.slots[address].pinned = False

    def loaded_size(self) -> int:
        return sum(s.size for s in self.slots.values() if s.memory is not None)

    def free_memory(self, size_bytes: int) -> int:
        freed = 0
        for slot in sorted(self.slots.values(), key=lambda s: s.last_fault):
            if freed >= size_bytes:
                break
            if slot.memory is not None and not slot.pinned:
                freed += slot.size
                slot.evict()
        return freed

    def prioritize(self, malloc_async_clamp=None) -> None:
        """Eviction order between models: one model at a time here, so nothing to order."""

    def deprioritize(self) -> None:
        """See prioritize."""

    def tensor(self, address: int, size: int) -> torch.Tensor:
        slot = self.slots[address]
        if slot.memory is None or slot.memory.numel() != size:
            raise RuntimeError("emulated VRAM: a slot was read without a successful fault")
        slot.transfers += 1
        return slot.memory


def aimdo_to_tensor_on_cpu(alloc, device) -> torch.Tensor:
    owner, address, size = alloc
    if not isinstance(owner, CpuVbar):
        raise TypeError(f"emulated VRAM: aimdo_to_tensor on a {type(owner).__name__} (only vbar slots exist here)")
    return owner.tensor(address, size)


class CpuCudart:
    """Stand-in for torch.cuda.cudart(): host registrations always succeed and are counted."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}  # address -> bytes

    def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:
        self.registered[pointer] = size
        return 0

    def cudaHostUnregister(self, pointer: int) -> int:
        self.registered.pop(pointer, None)
        return 0

    def unregister_range(self, start: int, end: int) -> None:
        for pointer in [p for p in self.registered if start <= p < end]:
            del self.registered[pointer]


class CpuHostBuffer:
    """Stand-in for comfy_aimdo's HostBuffer: a fixed reservation that grows and shrinks at its end.

    The reservation is allocated once (the OS commits pages only when written), so its address never
    moves, as the real buffer's virtual range does not.
    """

    def __init__(self, cudart: CpuCudart, size: int, prewarm: int = 0, max_grow_size: int = 0, mark_cold=True):
        self.cudart = cudart
        self.capacity = max(int(size), int(max_grow_size))
        self._memory = torch.empty(self.capacity, dtype=torch.uint8) if self.capacity else None
        self.size = 0
        if size:
            self.extend(size)

    def get_raw_address(self) -> int:
        return self._memory.data_ptr() if self._memory is not None else 0

    def extend(self, size: int, reallocate: bool = False, register: bool = True) -> int:
        if self.size + int(size) > self.capacity:
            raise RuntimeError("HostBuffer.extend failed")
        self.size += int(size)
        return self.get_raw_address()

    def truncate(self, size: int, do_unregister: bool = True) -> None:
        """Shrink to `size`; the real buffer also drops the page-lock registrations of the cut part."""
        if do_unregister:
            self.cudart.unregister_range(self.get_raw_address() + int(size), self.get_raw_address() + self.capacity)
        self.size = int(size)


def cast_on_emulated_device(cast: Callable, emulated: torch.device) -> Callable:
    """comfy.ops.cast_bias_weight, told to compute on the emulated device when a slotted layer computes on the CPU."""

    @functools.wraps(cast)
    def wrapper(s, input=None, dtype=None, device=None, *args, **kwargs):
        target = device if device is not None else getattr(input, "device", None)
        if hasattr(s, "_v") and target == CPU:
            device = emulated
        return cast(s, input, dtype, device, *args, **kwargs)

    return wrapper


@contextmanager
def replaced(owner, name: str, value) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@dataclass
class EmulatedDynamicVram:
    """What a test uses inside `emulated_dynamic_vram()`: the device, patcher conversion, statistics."""

    device: torch.device
    memory: DeviceMemory
    cudart: CpuCudart
    host_buffers: weakref.WeakSet[CpuHostBuffer] = field(default_factory=weakref.WeakSet)

    def host_buffer(self, *args, **kwargs) -> CpuHostBuffer:
        """The HostBuffer stand-in ComfyUI constructs in place of comfy_aimdo's."""
        buffer = CpuHostBuffer(self.cudart, *args, **kwargs)
        self.host_buffers.add(buffer)
        return buffer

    def dynamic(self, patcher):
        """A ModelPatcherDynamic on `patcher`'s model for the emulated GPU, built as ComfyUI's loaders build it.

        `patcher` must come fresh from a loader (no weight patches, not loaded; the object patches a loader
        sets, such as a text encoder's compute dtype, are carried over): apply LoRAs to the result
        (comfy.sd.load_lora_for_models clones it, as in ComfyUI). Do not use `patcher` afterwards.
        """
        import comfy.model_patcher

        if patcher.is_dynamic():
            raise ValueError("the patcher is already dynamic")
        if patcher.patches or patcher.weight_wrapper_patches or patcher.backup:
            raise ValueError("convert the patcher a loader returned, before patching or loading it")
        dynamic = comfy.model_patcher.ModelPatcherDynamic(
            patcher.model,
            load_device=self.device,
            offload_device=patcher.offload_device,
            size=patcher.model_size(),
            weight_inplace_update=patcher.weight_inplace_update,
        )
        dynamic.cached_patcher_init = patcher.cached_patcher_init
        dynamic.object_patches = dict(patcher.object_patches)  # what the loader set (a CLIP's manual_cast_dtype)
        return dynamic

    @contextmanager
    def building(self) -> Iterator[None]:
        """ComfyUI's loaders called inside build dynamic patchers for the emulated GPU, as main.py sets up a GPU."""
        import comfy.memory_management
        import comfy.model_management
        import comfy.model_patcher

        with ExitStack() as stack:
            stack.enter_context(replaced(comfy.model_management, "get_torch_device", lambda: self.device))
            dynamic = comfy.model_patcher.ModelPatcherDynamic
            stack.enter_context(replaced(comfy.model_patcher, "CoreModelPatcher", dynamic))
            stack.enter_context(replaced(comfy.memory_management, "aimdo_enabled", True))
            yield

    def slot(self, module: torch.nn.Module) -> Slot:
        """The emulated VRAM slot ComfyUI gave a layer (AttributeError for a layer it loaded without one)."""
        vbar, address, _ = module._v
        return vbar.slots[address]

    def unload_all(self) -> None:
        """ComfyUI's own unload of every model on the emulated device (free_memory for all of it)."""
        import comfy.model_management

        comfy.model_management.free_memory(1e30, self.device)

    def stats(self) -> dict[str, int]:
        slots = [s for v in self.memory.vbars for s in v.slots.values()]
        return {
            "slots": len(slots),
            "resident_bytes": self.memory.resident_bytes(),
            "host_buffer_bytes": sum(b.size for b in self.host_buffers),
            "registered_pin_bytes": sum(self.cudart.registered.values()),
            "faults": sum(s.faults for s in slots),
            "failed_faults": sum(s.failed_faults for s in slots),
            "transfers": sum(s.transfers for s in slots),
            "evictions": sum(s.evictions for s in slots),
        }


@contextmanager
def emulated_dynamic_vram(pinned_memory: int = 4 * 1024**3, vram: int | None = None) -> Iterator[EmulatedDynamicVram]:
    """Run ComfyUI's Dynamic VRAM code on the CPU (see the module docstring for what is replaced).

    pinned_memory: the pin budget (bytes; 0 declines every pin, as ComfyUI does without a GPU).
    vram: the emulated VRAM size in bytes (None: unlimited); when full, faults evict unpinned slots
    or fail, and ComfyUI then casts through scratch buffers without committing.
    Models still loaded on the emulated device are unloaded (by ComfyUI) before everything is restored.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"emulated Dynamic VRAM is not available: {reason}")
    import comfy.model_management
    import comfy.ops
    import comfy_aimdo.host_buffer
    import comfy_aimdo.model_vbar
    import comfy_aimdo.torch

    emulation = EmulatedDynamicVram(EMULATED_DEVICE, DeviceMemory(vram), CpuCudart())
    real_is_device_cpu = comfy.model_management.is_device_cpu

    def is_device_cpu(device) -> bool:
        return not (isinstance(device, torch.device) and device == EMULATED_DEVICE) and real_is_device_cpu(device)

    with ExitStack() as stack:
        stack.enter_context(replaced(comfy_aimdo.model_vbar, "ModelVBAR", functools.partial(CpuVbar, emulation.memory)))
        stack.enter_context(replaced(comfy_aimdo.torch, "aimdo_to_tensor", aimdo_to_tensor_on_cpu))
        stack.enter_context(replaced(comfy_aimdo.host_buffer, "HostBuffer", emulation.host_buffer))
        stack.enter_context(replaced(torch.cuda, "cudart", lambda: emulation.cudart))
        stack.enter_context(replaced(comfy.model_management, "MAX_PINNED_MEMORY", pinned_memory or -1))
        stack.enter_context(replaced(comfy.model_management, "is_device_cpu", is_device_cpu))
        cast = cast_on_emulated_device(comfy.ops.cast_bias_weight, EMULATED_DEVICE)
        stack.enter_context(replaced(comfy.ops, "cast_bias_weight", cast))
        stack.callback(emulation.unload_all)  # runs first on exit, while the stand-ins are still in place
        yield emulation
