"""The compiled fast path: ``update`` compiled or captured in a CUDA graph, once per batch shape.

A trainer whose batches have a fixed shape can run the tracker's ``update``
as one compiled function (``torch.compile(fullgraph=True, dynamic=False)``)
or, on CUDA, as one CUDA-graph launch, instead of its 50 to 250 eager ops.
``CompiledUpdate`` wraps a tracker and does so, with what users otherwise
trip on handled in one place:

* **Shapes.** Each input signature (the shapes, dtypes and devices of the
  inputs given, which of the optional ones are given, and ``update`` or
  ``update_with_report``) gets its own compiled function or graph, kept in
  a cache of at most ``max_shapes`` signatures. A new batch size compiles
  (inductor: 2 to 30 s on a 2-core CPU) or captures (milliseconds) again;
  a signature already seen costs a dictionary look-up. Each signature's
  compiled function has a code object of its own, so torch.compile's
  recompile limit (8 per code object) never counts several trackers or
  shapes together.
* **Warm-up.** The first call of a signature runs the tracker's eager
  ``update`` (its inputs and outputs are the real ones): any state the
  tracker allocates lazily then exists before anything is traced or
  captured, so each signature compiles once. With ``"compile"`` the second
  call compiles; with ``"cuda_graph"`` the first call runs on a side stream
  and is then captured; with ``"compile+cuda_graph"`` the second call
  compiles on a side stream and is captured. ``warm_up`` does all of that
  ahead of time and puts the state back.
* **State.** The compiled function and the graph read and write the
  tracker's own state tensors, which ``load_state_dict`` copies into in
  place (and ``set_prior`` writes in place), so both stay valid after it:
  reset a tracker by loading a fresh tracker's state dict. Eager calls of
  ``tracker.update`` can be mixed in.
* **Checks.** The tracker's value checks (ids in range, finite rewards)
  read values back to the host, which neither a compiled function nor a
  CUDA graph can do, so ``CompiledUpdate`` refuses a tracker whose
  ``check_values`` is on (at construction and at every call). Shapes,
  dtypes and devices are checked for each new signature by the tracker's own
  checks; a signature seen before is valid. Out-of-range ids are then
  undefined behaviour, as for any tracker with ``check_values=False``.
* **Reproducibility.** With more than one thread, inductor's CPU code adds
  into the groups' rows with atomics in parallel loops, so sums can round
  differently from run to run (in-batch GRPO at N = 32768 on two threads:
  up to 8e-7 apart; one thread, or N = 512, gave equal bits). Under
  ``torch.use_deterministic_algorithms(True)``, set by the caller before
  the first calls, inductor sums in one fixed order on any number of
  threads, at a cost (there: 0.58 against 0.25 ms per update). Eager
  updates and CUDA-graph replays are deterministic either way.
* **Outputs.** Compiled functions return new tensors. A graph replay writes
  its outputs into the graph's static tensors; ``copy_outputs=True`` (the
  default) returns copies, ``False`` the static tensors themselves, which
  the next call of that signature overwrites.

Modes (``mode=``): ``"compile"`` (the default off CUDA; ``backend=``
``"inductor"`` by default, with its C++ wrapper on a CPU; ``"aot_eager"``
runs the eager kernels and is bit for bit equal to eager), ``"cuda_graph"`` (the default on CUDA: the
eager update captured, bit for bit equal to eager on CUDA, no compile
time) and ``"compile+cuda_graph"`` (the compiled update captured). Under
torch.compile the tracker picks its sync-free algorithms
(``ops.is_compiling``); on CUDA every default algorithm is sync-free, so
the graph modes capture what eager CUDA runs.

Dimensions: N samples in a batch, P prompts, C reward functions.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from rail_interview.stat_tracking.tracker import AdvantageTracker
from rail_interview.stat_tracking.types import UpdateReport

__all__ = ["CPU_INDUCTOR_OPTIONS", "CompiledUpdate", "MODES"]

#: The ways to run ``update``: compiled, captured in a CUDA graph, or compiled then captured.
MODES = ("compile", "cuda_graph", "compile+cuda_graph")
#: torch.compile's options for inductor on a CPU, unless others are given: inductor's wrapper
#: around its kernels in C++, which at N = 256 took about 0.7 of the time of its Python one.
CPU_INDUCTOR_OPTIONS: Dict[str, Any] = {"cpp_wrapper": True}
#: The inputs of ``update``, in the order a signature lists them.
INPUT_NAMES = ("prompt_ids", "rewards", "valid", "discount", "weights")

Output = Union[torch.Tensor, UpdateReport]
#: prompt_ids, rewards, valid, discount, weights (the last three may be None).
Inputs = Tuple[Optional[torch.Tensor], ...]
#: Whether the report is asked for, then each input's (shape, dtype, device) or None.
Signature = Tuple[Any, ...]


def _call(
    method: Callable[..., Output],
    prompt_ids: torch.Tensor,
    rewards: torch.Tensor,
    valid: Optional[torch.Tensor],
    discount: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
) -> Output:
    """One call of ``update`` or ``update_with_report``: what is compiled or captured."""
    return method(prompt_ids, rewards, valid, discount=discount, weights=weights)


def _with_own_code(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with a code object of its own.

    torch.compile caches compiled graphs on the code object and allows
    ``recompile_limit`` (8) of them per code object: with one per signature,
    trackers and shapes never share that limit, and a call checks the guards
    of its own signature only.
    """
    code = function.__code__.replace()  # a new code object, equal to the old one
    return types.FunctionType(code, function.__globals__, function.__name__)


def _signature(inputs: Inputs, report: bool) -> Optional[Signature]:
    """What a compiled function or graph is specific to, or None if an input is not a tensor (nor None)."""
    key: List[Any] = [report]
    for tensor in inputs:
        if tensor is None:
            key.append(None)
        elif isinstance(tensor, torch.Tensor):
            key.append((tensor.shape, tensor.dtype, tensor.device))
        else:
            return None
    return tuple(key)


def _describe(signature: Signature) -> str:
    """A signature as text: ``update(prompt_ids int64 [256], rewards float32 [256])``."""
    parts = [
        f"{name} {str(spec[1]).replace('torch.', '')} {list(spec[0])}"
        for name, spec in zip(INPUT_NAMES, signature[1:])
        if spec is not None
    ]
    return f"{'update_with_report' if signature[0] else 'update'}({', '.join(parts)})"


def _clone(output: Output) -> Output:
    """A copy of an output: the advantages, or each tensor of a report."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    return type(output)(*(None if field is None else field.clone() for field in output))


def _record_stream(output: Output, stream: "torch.cuda.Stream") -> None:
    """Marks an output made on a side stream as used on ``stream``, for the caching allocator."""
    for tensor in [output] if isinstance(output, torch.Tensor) else output:
        if tensor is not None:
            tensor.record_stream(stream)


class _Entry:
    """One signature's state: the calls it served, its compiled function, and its CUDA graph."""

    def __init__(self) -> None:
        self.calls = 0
        self.compiled: Optional[Callable[..., Output]] = None
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.static_inputs: Inputs = ()
        self.static_output: Optional[Output] = None


class CompiledUpdate:
    """A tracker's ``update``, compiled or captured in a CUDA graph once per batch shape.

    ``fast(prompt_ids, rewards, ...)`` returns what ``tracker.update`` would
    and changes the tracker's state as it would; ``update_with_report``
    likewise. The module docstring says what happens on the first calls of
    a shape, what each mode costs and why the tracker's value checks must be
    off. In short: the first call of a shape runs eagerly, the second (with
    ``"compile"``) compiles, and from then on a call is a look-up of the
    inputs' shapes and one compiled call or graph replay.

    Args:
        tracker: an ``AdvantageTracker`` (any class or preset of this
            package) with ``check_values=False`` and no process group.
        mode: ``"compile"``, ``"cuda_graph"`` or ``"compile+cuda_graph"``
            (the latter two need a CUDA tracker), or None: ``"cuda_graph"``
            on CUDA, ``"compile"`` elsewhere.
        backend: torch.compile's backend for the compile modes (a name or
            a callable), or None for ``"inductor"``. ``"aot_eager"`` and
            ``"eager"`` run the eager kernels: bit for bit equal to eager and
            far quicker to compile, for tests. Not taken by ``"cuda_graph"``.
        options: torch.compile's ``options`` for the backend, as given, or
            None for ``CPU_INDUCTOR_OPTIONS`` with inductor on a CPU (C++
            in place of inductor's Python wrapper around its kernels: the
            update at N = 256 took about 0.7 of the time, for up to 4 times
            the compile time) and none otherwise; ``{}`` for inductor's own
            defaults. Not taken by ``"cuda_graph"``.
        max_shapes: the most signatures compiled or captured at once (each
            keeps its compiled code, and a graph its memory pool), or None
            for no cap. A new signature beyond it is refused.
        copy_outputs: graph modes: return copies of the graph's outputs
            (True) or the graph's static output tensors, which the next
            call of the same shape overwrites (False; one copy kernel less
            per output). Compiled functions always return new tensors.

    Raises:
        TypeError: if ``tracker`` is not an ``AdvantageTracker``.
        ValueError: if the tracker checks values or has a process group,
            ``mode`` is unknown or needs CUDA on another device, a backend or
            options are given to ``"cuda_graph"``, or ``max_shapes`` is not
            positive.

    Example:
        >>> from rail_interview.stat_tracking import BufferStatTracker, CompiledUpdate
        >>> tracker = BufferStatTracker(4, buffer_size=8, min_count=2, check_values=False)
        >>> fast = CompiledUpdate(tracker, backend="aot_eager")  # "inductor" by default
        >>> ids, rewards = torch.tensor([0, 1, 0, 1]), torch.tensor([1.0, 2.0, 3.0, 6.0])
        >>> fast(ids, rewards)  # the first call of a shape runs eagerly
        tensor([-1.0000, -1.0000,  1.0000,  1.0000])
        >>> fast(ids, torch.tensor([5.0, 0.0, 1.0, 2.0]))  # the second compiles; later ones reuse it
        tensor([ 1.5076, -1.1471, -0.9045, -0.2294])
        >>> fast.shapes
        ('update(prompt_ids int64 [4], rewards float32 [4])',)
    """

    def __init__(
        self,
        tracker: AdvantageTracker,
        *,
        mode: Optional[str] = None,
        backend: Union[str, Callable[..., Any], None] = None,
        options: Optional[Dict[str, Any]] = None,
        max_shapes: Optional[int] = 8,
        copy_outputs: bool = True,
    ) -> None:
        if not isinstance(tracker, AdvantageTracker):
            raise TypeError(f"CompiledUpdate wraps an AdvantageTracker, got {type(tracker).__name__}")
        if tracker.process_group is not None:
            raise ValueError(
                "CompiledUpdate does not take a tracker with a process group: its update gathers the ranks' "
                "batches, which it does not compile or capture; call tracker.update"
            )
        _refuse_value_checks(tracker)
        device = tracker.device
        if mode is None:
            mode = "cuda_graph" if device.type == "cuda" else "compile"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None (chosen by device), got {mode!r}")
        if mode != "compile" and device.type != "cuda":
            raise ValueError(f"mode={mode!r} needs a tracker on a CUDA device, this one is on {device}")
        if mode == "cuda_graph" and (backend is not None or options is not None):
            raise ValueError(
                "mode='cuda_graph' captures the eager update and compiles nothing: a backend or options need "
                "mode='compile' or 'compile+cuda_graph'"
            )
        if max_shapes is not None and (isinstance(max_shapes, bool) or not isinstance(max_shapes, int)):
            raise ValueError(f"max_shapes must be a positive int or None, got {max_shapes!r}")
        if max_shapes is not None and max_shapes < 1:
            raise ValueError(f"max_shapes must be a positive int or None, got {max_shapes!r}")
        self._tracker, self._mode, self._max_shapes = tracker, mode, max_shapes
        self._backend = None if mode == "cuda_graph" else ("inductor" if backend is None else backend)
        if options is None and self._backend == "inductor" and device.type == "cpu":
            options = CPU_INDUCTOR_OPTIONS
        self._options = None if options is None else dict(options)
        self._copy_outputs = bool(copy_outputs)
        self._entries: Dict[Signature, _Entry] = {}

    @property
    def tracker(self) -> AdvantageTracker:
        """The tracker whose state the calls update."""
        return self._tracker

    @property
    def mode(self) -> str:
        """``"compile"``, ``"cuda_graph"`` or ``"compile+cuda_graph"``."""
        return self._mode

    @property
    def backend(self) -> Union[str, Callable[..., Any], None]:
        """torch.compile's backend, or None for ``"cuda_graph"``."""
        return self._backend

    @property
    def options(self) -> Optional[Dict[str, Any]]:
        """torch.compile's options, or None."""
        return None if self._options is None else dict(self._options)

    @property
    def shapes(self) -> Tuple[str, ...]:
        """The signatures seen so far, oldest first, as text (``update(prompt_ids int64 [256], ...)``)."""
        return tuple(_describe(signature) for signature in self._entries)

    def __repr__(self) -> str:
        backend = getattr(self._backend, "__name__", self._backend)
        return (
            f"CompiledUpdate({self._tracker!r}, mode={self._mode!r}, backend={backend!r}, "
            f"max_shapes={self._max_shapes!r}, shapes={len(self._entries)})"
        )

    def __call__(
        self,
        prompt_ids: torch.Tensor,
        rewards: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
        *,
        discount: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``tracker.update``, compiled or replayed: adds a batch and returns its advantages.

        Args:
            prompt_ids: integer [N], ids in [0, P) (keys with hashed keys).
            rewards: float or integer [N], or [N, C] with several rewards.
            valid: bool [N] or None, as for ``tracker.update``.
            discount: float [N] or None (the Beta memory's per-sample rho).
            weights: float or integer [N] or None (sample weights).

        Returns:
            The tracker's ``dtype`` [N], the advantages, on its device: equal
            to what ``tracker.update`` returns (bit for bit with the graph
            modes and with the ``"aot_eager"`` and ``"eager"`` backends).

        Raises:
            TypeError, ValueError: for inputs ``tracker.update`` refuses
                (types, shapes, dtypes, devices), for a new signature beyond
                ``max_shapes``, or if the tracker's ``check_values`` was
                switched on; the state is then unchanged.
        """
        return self._run((prompt_ids, rewards, valid, discount, weights), report=False)

    def update_with_report(
        self,
        prompt_ids: torch.Tensor,
        rewards: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
        *,
        discount: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> UpdateReport:
        """``tracker.update_with_report``, compiled or replayed (a signature of its own).

        Args:
            prompt_ids: as for ``__call__``.
            rewards: as for ``__call__``.
            valid: as for ``__call__``.
            discount: as for ``__call__``.
            weights: as for ``__call__``.

        Returns:
            The ``UpdateReport``, its tensors as ``tracker.update_with_report``'s.

        Raises:
            TypeError, ValueError: as ``__call__``.
        """
        return self._run((prompt_ids, rewards, valid, discount, weights), report=True)

    def warm_up(
        self,
        prompt_ids: torch.Tensor,
        rewards: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
        *,
        discount: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
        report: bool = False,
    ) -> None:
        """Compiles or captures the inputs' signature now, leaving the tracker's state as it was.

        The inputs are an example batch of the shape to come (valid values:
        they are updated with). The state is saved with ``state_dict`` before
        and put back with ``load_state_dict`` after, as a checkpoint would
        (which reads values back to the host): what is not in the state dict
        starts over as after a load, such as a hashed-key table's
        ``index_overflows`` counter (zeroed). Nothing happens for a
        signature already warm.

        Args:
            prompt_ids: as for ``__call__``.
            rewards: as for ``__call__``.
            valid: as for ``__call__``.
            discount: as for ``__call__``.
            weights: as for ``__call__``.
            report: warm ``update_with_report`` instead of ``update``.

        Raises:
            TypeError, ValueError: as ``__call__``.
        """
        inputs = (prompt_ids, rewards, valid, discount, weights)
        entry = self._entries.get(_signature(inputs, report))
        if entry is not None and self._is_warm(entry):
            return
        state = self._tracker.state_dict()
        try:
            while True:
                self._run(inputs, report)
                entry = self._entries.get(_signature(inputs, report))
                if entry is None or self._is_warm(entry):  # None: an empty batch, which runs eagerly
                    break
        finally:
            self._tracker.load_state_dict(state)

    def clear(self) -> None:
        """Forgets every compiled function and CUDA graph (the next call of each shape starts over)."""
        self._entries.clear()

    def _is_warm(self, entry: _Entry) -> bool:
        """Whether a signature's calls are compiled calls or replays from now on."""
        return entry.graph is not None if self._mode != "compile" else entry.compiled is not None

    def _run(self, inputs: Inputs, report: bool) -> Output:
        """Checks the signature, then runs its eager call, its compiled function or its graph."""
        if self._tracker.check_values:
            _refuse_value_checks(self._tracker)
        signature = _signature(inputs, report)
        entry = self._entries.get(signature) if signature is not None else None
        method = self._tracker.update_with_report if report else self._tracker.update
        if entry is None:
            entry = self._new_entry(signature, inputs, report)
            if entry is None:  # an empty batch: nothing to compile
                return _call(method, *inputs)
        if entry.graph is not None:
            return self._replay(entry, inputs)
        entry.calls += 1
        if entry.calls == 1 and self._mode != "cuda_graph":
            return _call(method, *inputs)  # eager: lazily allocated state exists before tracing
        if self._mode != "cuda_graph" and entry.compiled is None:
            entry.compiled = torch.compile(
                _with_own_code(_call), fullgraph=True, dynamic=False, backend=self._backend, options=self._options
            )
        if self._mode == "compile":
            return entry.compiled(method, *inputs)
        return self._capture(entry, entry.compiled or _call, method, inputs)

    def _new_entry(self, signature: Optional[Signature], inputs: Inputs, report: bool) -> Optional[_Entry]:
        """Checks a new signature's inputs as ``update`` does, and adds its entry (None for an empty batch).

        Raises:
            TypeError, ValueError: if ``update`` refuses the inputs, or the cache is full.
        """
        self._tracker._validate_inputs(*inputs)  # pylint: disable=protected-access  # no value is read
        if signature is None:  # the checks refuse what is not a tensor; this is a safety net
            raise TypeError("CompiledUpdate's inputs must be tensors (or None for the optional ones)")
        if inputs[0].shape[0] == 0:
            return None
        if self._max_shapes is not None and len(self._entries) >= self._max_shapes:
            raise ValueError(
                f"CompiledUpdate holds {len(self._entries)} input signatures, its max_shapes; a new one, "
                f"{_describe(signature)}, would compile or capture again (inductor: up to 30 s on a CPU). "
                "Pad batches to a few fixed sizes, raise max_shapes (None: no cap), or clear() the cache. "
                f"Held: {', '.join(self.shapes)}"
            )
        entry = self._entries[signature] = _Entry()
        return entry

    def _capture(self, entry: _Entry, run: Callable[..., Output], method: Callable[..., Output], inputs: Inputs):
        """Runs ``run`` on static copies of the inputs on a side stream, then captures it in a CUDA graph.

        The side-stream run is this call's update, and its result is
        returned; the capture records the same call without running it.
        """
        device = self._tracker.device
        with torch.cuda.device(device), torch.no_grad():
            static = tuple(
                None if tensor is None else tensor.detach().clone(memory_format=torch.contiguous_format)
                for tensor in inputs
            )
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                result = run(method, *static)
            current.wait_stream(side)
            _record_stream(result, current)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = run(method, *static)
        entry.graph, entry.static_inputs, entry.static_output = graph, static, output
        return result

    def _replay(self, entry: _Entry, inputs: Inputs) -> Output:
        """Copies the inputs into the graph's static tensors, replays it, and returns its outputs."""
        with torch.no_grad():
            for static, tensor in zip(entry.static_inputs, inputs):
                if static is not None:
                    static.copy_(tensor)
            entry.graph.replay()
        entry.calls += 1
        return _clone(entry.static_output) if self._copy_outputs else entry.static_output


def _refuse_value_checks(tracker: AdvantageTracker) -> None:
    """Raises ValueError: the tracker's value checks are on."""
    if tracker.check_values:
        raise ValueError(
            "CompiledUpdate needs a tracker with check_values=False: its value checks (ids in range, finite "
            "rewards) read values back to the host, which a compiled function or a CUDA graph cannot do. "
            "Build the tracker with check_values=False, or set tracker.check_values = False once the inputs "
            "are trusted (shapes, dtypes and devices are still checked for every new input shape)."
        )
