"""Data-parallel online learners: N processes started by ``torchrun``, the policy sharded with FSDP2.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1, ``env://`` rendezvous) an online learner runs as N
processes joined in one process group (gloo on CPU, nccl on CUDA):

- **Rank 0 drives.** It runs the online shell (:mod:`agentrl.learners.loop`) as one process would: it plays
  every rollout, calls the hooks, writes the logs and checkpoints and syncs the weights. The shell's model on
  rank 0 is a plain full copy of the policy, so the ``hf`` sampler, the identity check, the monitors,
  ``save_pretrained`` and :func:`~agentrl.learners.policy_model.export_weights` work on it unchanged. The other
  ranks serve: they wait for each step's trajectories and take part in the collectives.
- **Every rank trains.** Each holds the policy sharded with ``fully_shard`` (see :func:`shard`) and its shard
  of the optimizer state. Each update, rank 0 broadcasts the step's groups; every rank
  filters them and computes the advantages on all of them (the same numbers everywhere, group baselines
  intact), then trains on its share of the kept trajectories (:func:`local_share`: contiguous, in group
  order, the same count on every rank). After the update the full weights are gathered into rank 0's copy.

Rank 0 plays all rollouts because a sharded module cannot sample on one rank alone (every forward gathers
parameters from all ranks, so ranks sampling different episodes would wait on each other forever), and
because one env, one sandbox pool and one sampler per run keep a data-parallel run on the very episodes a
one-process run with the same seed plays: only the update is spread.

**The same loss as one process.** A minibatch's loss is normalised by totals of the whole minibatch, so
each rank's loss is its part of the one-process loss and the parts add up to it: the token count (token-mean)
and the sequence count (the sequence means) are summed over ranks (:func:`all_sum`) before any rank divides,
and the gradients are summed, not averaged, over ranks. Dividing each rank's loss by its own token count
would weigh a token on a rank with few tokens more than one on a rank with many: a biased gradient. With
``minibatches`` 1 an update equals the one-process update up to float rounding (any ``mu``, any
``micro_batch_size``); with more, the ranks' ``j``-th minibatches together are a minibatch of the same size,
drawn otherwise than one process draws it. An update's statistics are summed over the ranks
(:func:`reduce_stats`): the loss terms are the objective itself, the token means (clip fraction, ratio) the
mean over micro-batches, weighted by samples.

**The same number of forwards on every rank.** FSDP2's forwards and backwards are collectives, so every rank
runs as many as the others: the shares have equal counts, a short one padded with *fillers* (a copy of a
trajectory with no policy token: no loss, no gradient, counted in no total).

Supported learners: :data:`SUPPORTED`; the others (PPO's critic and its batch-wide whitening, online DPO)
stop with a :class:`~agentrl.errors.ConfigError` under torchrun. LoRA is not sharded yet either.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agentrl.data.buffer import TrajectoryGroup
from agentrl.data.trajectory import Trajectory
from agentrl.errors import ConfigError

__all__ = [
    "FILLER",
    "SUPPORTED",
    "TRAINERS",
    "World",
    "all_sum",
    "announce",
    "check",
    "dismiss",
    "divide_gradients",
    "full_state_dict",
    "init",
    "is_filler",
    "is_sharded",
    "local_share",
    "reduce_stats",
    "run_online",
    "serve_runs",
    "shard",
    "world",
]

SUPPORTED = frozenset({"grpo"})
"""Learners (their names in checkpoint metadata) that run data-parallel."""
TRAINERS = {"agentrl.learners.grpo:train_grpo": "grpo"}
"""The learner each supported ``train`` function (``module:function``, as ``agentrl train`` names it) runs."""
FILLER = "data_parallel_filler"
"""The ``meta`` key that marks a filler trajectory (see the module docstring)."""
TIMEOUT = datetime.timedelta(hours=24)
"""How long a rank waits in a collective: the serving ranks wait through rank 0's SFT and eval phases."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` as torchrun sets them)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0


def world() -> World:
    """The ranks as torchrun's environment describes them; one rank without it. Imports no torch."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str = "cpu") -> World:
    """Join the process group (``env://``; gloo on CPU, nccl on CUDA) unless joined already.

    Raises:
        ConfigError: ``device`` names one GPU (``cuda:1``): under torchrun each rank takes ``cuda:LOCAL_RANK``,
            so the device must be ``cuda``.
    """
    import torch
    import torch.distributed as dist

    here = world()
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.device(device).index is not None:
            raise ConfigError(f"device={device!r} under torchrun: set device='cuda' (each rank takes cuda:LOCAL_RANK)")
        torch.cuda.set_device(here.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=TIMEOUT)
    return here


def _active() -> bool:
    if world().size <= 1:
        return False
    import torch.distributed as dist

    return dist.is_initialized()


# ---- the data: shares and totals ----------------------------------------------------------------
def local_share(trajectories: Sequence[Trajectory], values: Sequence[np.ndarray]
                ) -> tuple[list[Trajectory], list[np.ndarray]]:  # fmt: skip
    """This rank's share of a step's trajectories and their per-trajectory values (e.g. advantages): the
    ``r``-th of ``size`` contiguous slices of equal count, the short ones padded with fillers (zero values).
    One process: everything, unchanged."""
    here = world()
    if here.size <= 1 or not trajectories:
        return list(trajectories), list(values)
    count = -(-len(trajectories) // here.size)  # ceil: every rank runs this many
    bounds = np.array_split(np.arange(len(trajectories)), here.size)[here.rank]
    mine = [trajectories[i] for i in bounds]
    vals = [values[i] for i in bounds]
    template = mine[0] if mine else trajectories[-1]
    while len(mine) < count:
        mine.append(_filler(template))
        vals.append(np.zeros(len(template.token_ids)))
    return mine, vals


def _filler(template: Trajectory) -> Trajectory:
    n = len(template.token_ids)
    return dataclasses.replace(template, logprobs=[0.0] * n, loss_mask=[0] * n, turns=[], meta={FILLER: True})


def is_filler(trajectory: Trajectory) -> bool:
    """Whether ``trajectory`` pads a short share (it counts in no total)."""
    return bool(trajectory.meta.get(FILLER))


def all_sum(values: Sequence[float]) -> list[float]:
    """``values`` summed element-wise over the ranks (float64); themselves in one process."""
    if not _active():
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return total.cpu().tolist()


def _comm_device() -> Any:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def reduce_stats(stats: Mapping[str, float]) -> dict[str, float]:
    """An update's statistics over the ranks: each rank's are its part of the whole (added up), except the
    gradient norms, which every rank already holds whole (``clip_grad_norm_`` reduces over the shards)."""
    if not _active():
        return dict(stats)
    keys = sorted(stats)
    summed = all_sum([stats[k] for k in keys])
    return {k: stats[k] if k.endswith("grad_norm") else s for k, s in zip(keys, summed, strict=True)}


# ---- the model ------------------------------------------------------------------------------------
def shard(model: Any) -> Any:
    """Wrap ``model`` with FSDP2 and return it (sharded in place: its parameters are new objects).

    ``fully_shard`` goes on each decoder layer (the classes its ``_no_split_modules`` names), then on the
    modules holding the other parameters as one group (the embeddings, the final norm and the LM head: tied
    embeddings stay in one group, and the logprob path, which calls the decoder and the head apart, finds
    each of them unsharded when it runs), then on the root, which is initialised at once. Gradients are
    summed over the ranks, not averaged: each rank's loss is already its part of the whole. Rank 0's weights
    are broadcast first, so every rank starts from the same ones.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    for tensor in model.state_dict().values():
        dist.broadcast(tensor.data, src=0)
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    rest = [m for m in model.modules() if any(id(p) not in inside for p in m.parameters(recurse=False))]
    if rest:
        fully_shard(rest)
    fully_shard(model)
    # The root initialises first (FSDP2 asks for it): the logprob path never runs the root's own forward.
    fully_shard.state(model)._lazy_init()  # type: ignore[attr-defined]
    divide_gradients(model, 1.0)
    return model


def divide_gradients(model: Any, factor: float) -> None:
    """Divide the gradients summed over the ranks by ``factor`` in every FSDP group of ``model`` (FSDP2's own
    default is the number of ranks: an average). The collectives reduce with a plain sum, then scale (gloo
    has no pre-multiplied sum)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(factor)
            module.set_force_sum_reduction_for_comms(True)


def is_sharded(model: Any) -> bool:
    """Whether ``model`` was wrapped by :func:`shard` (FSDP2)."""
    if world().size <= 1:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: Any) -> dict[str, Any]:
    """The sharded ``model``'s full (unsharded) state dict on CPU, on rank 0; ``{}`` on the others.
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rebind(optimizer: Any, model: Any, names: Mapping[int, str]) -> None:
    """Point ``optimizer`` (built before sharding, no step taken) at the sharded parameters of the same names."""
    if optimizer.state:
        raise ConfigError("the optimizer took a step before the model was sharded; shard before training")
    params = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [params[names[id(p)]] for p in group["params"]]


def _sharded_learner(online: Any) -> Any:
    """Shard ``online.model`` and point its optimizer at the shards (every rank)."""
    from agentrl.learners.optim import Joint

    if isinstance(online.optimizer, Joint) or online.saved:
        raise ConfigError("this learner trains several models; data-parallel training covers one policy")
    names = {id(p): n for n, p in online.model.named_parameters()}
    shard(online.model)
    _rebind(online.optimizer, online.model, names)
    return online


# ---- rank 0 drives, the others serve --------------------------------------------------------------
def _send(*message: Any) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([message], src=0)


def _receive() -> tuple[Any, ...]:
    import torch.distributed as dist

    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return tuple(box[0])


def check(learner: str, config: Any) -> None:
    """Fail before any work where ``learner`` (e.g. ``"grpo"``) with ``config`` cannot run data-parallel.

    Raises:
        ConfigError: a learner not in :data:`SUPPORTED`, or LoRA.
    """
    if learner not in SUPPORTED:
        raise ConfigError(f"{learner} does not run data-parallel yet (supported: {', '.join(sorted(SUPPORTED))}); "
                          "start it without torchrun")  # fmt: skip
    if getattr(config, "lora", None) is not None:
        raise ConfigError("LoRA does not run data-parallel yet; start it without torchrun, or drop lora")


def run_online(config: Any, learner: str, build: Callable[[], Any], shell: Callable[[Callable[[], Any]], Any]) -> Any:
    """The online learner ``learner`` on every rank (see the module docstring): rank 0 runs ``shell(build)``
    (the one-process shell) with a driving learner; the others serve it until it ends.

    Raises:
        ConfigError: ``learner`` does not run data-parallel (see :data:`SUPPORTED`), or LoRA is on.
    """
    check(learner, config)
    here = init(config.device)
    if here.rank != 0:
        from agentrl.learners import optim
        from agentrl.learners.result import TrainResult

        optim.seed_everything(config.seed)
        online = _sharded_learner(build())
        _serve(online)
        return TrainResult(online.model, online.tokenizer, (), None, {})
    result = shell(lambda: _driver(_sharded_learner_on_rank0(build)))
    # Only a run that ended well says stop: after an error the others may sit in another collective, so rank 0
    # leaves with the error instead, and torchrun ends the others.
    _send("stop")
    return result


def _sharded_learner_on_rank0(build: Callable[[], Any]) -> tuple[Any, Any]:
    online = build()
    plain = copy.deepcopy(online.model)
    return _sharded_learner(online), plain


def _update_on_rank(online: Any, step: int, groups: Sequence[TrajectoryGroup]) -> tuple[Any, dict[str, Any]]:
    update = online.update(step, groups)
    update = dataclasses.replace(update, stats=reduce_stats(update.stats))
    return update, full_state_dict(online.model)


def _serve(online: Any) -> None:
    """A serving rank: do what rank 0 asks until it says stop."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    while True:
        command, *args = _receive()
        if command == "stop":
            return
        if command == "update":
            _update_on_rank(online, *args)
        elif command == "optimizer_state":
            get_optimizer_state_dict(online.model, online.optimizer, options=_full())
        elif command == "load_optimizer_state":
            set_optimizer_state_dict(online.model, online.optimizer, {}, options=_full(broadcast=True))
        elif command == "load_scheduler_state":
            online.scheduler.load_state_dict(args[0])


def _full(broadcast: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=broadcast)


def _driver(built: tuple[Any, Any]) -> Any:
    """Rank 0's learner as the shell sees it: the plain copy as the model; updates, optimizer and scheduler
    states that reach every rank."""
    from agentrl.learners.loop import Online

    online, plain = built

    def update(step: int, groups: Sequence[TrajectoryGroup]) -> Any:
        _send("update", step, list(groups))
        result, full = _update_on_rank(online, step, groups)
        plain.load_state_dict(full)  # in place: a sampler holding ``plain`` samples with the new weights
        return result

    return Online(plain, online.tokenizer, _Optimizer(online), _Scheduler(online.scheduler), update,
                  online.saved, online.state)  # fmt: skip


class _Optimizer:
    """Rank 0's view of the sharded optimizer: the learning rate, and its full state for checkpoints."""

    def __init__(self, online: Any):
        self._online = online

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return list(self._online.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        _send("optimizer_state")
        return dict(get_optimizer_state_dict(self._online.model, self._online.optimizer, options=_full()))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        _send("load_optimizer_state")
        state = _by_name(state, self._online.model, self._online.optimizer)
        set_optimizer_state_dict(self._online.model, self._online.optimizer, dict(state),
                                 options=_full(broadcast=True))  # fmt: skip


def _by_name(state: Mapping[str, Any], model: Any, optimizer: Any) -> Mapping[str, Any]:
    """An optimizer state saved by one process (parameters by position) keyed by parameter name, as a
    data-parallel run saves it; a state keyed by name already is returned as it is."""
    groups = state["param_groups"]
    if not any(isinstance(p, int) for g in groups for p in g["params"]):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ConfigError("the checkpoint's optimizer state holds other parameters than this model; resume from "
                          "a checkpoint of the same model and settings")  # fmt: skip
    rename = {old: names[id(p)] for g, mine in zip(groups, optimizer.param_groups, strict=True)
              for old, p in zip(g["params"], mine["params"], strict=True)}  # fmt: skip
    return {
        "state": {rename[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [rename[p] for p in g["params"]]} for g in groups],
    }


class _Scheduler:
    """Rank 0's view of the schedulers (every rank steps its own, in the update): states reach every rank."""

    def __init__(self, scheduler: Any):
        self._scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return dict(self._scheduler.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _send("load_scheduler_state", dict(state))
        self._scheduler.load_state_dict(state)


# ---- the pipeline: runs announced by rank 0 ----------------------------------------------------------
def announce(train: str, config: Any) -> None:
    """Rank 0 of ``agentrl train``: tell the serving ranks (in :func:`serve_runs`) to join the online run of
    ``train`` (a ``module:function`` learner) with ``config``. Nothing in one process."""
    if _active():
        _send("run", train, config)


def dismiss() -> None:
    """Rank 0 of ``agentrl train``: the run is over; the serving ranks return from :func:`serve_runs`."""
    if _active():
        _send("done")


def serve_runs() -> int:
    """A serving rank of ``agentrl train`` (after :func:`init`): join each online run rank 0 announces, until
    it dismisses us. Returns 0 (the exit status)."""
    from agentrl._plugins import load_object

    while True:
        command, *args = _receive()
        if command == "done":
            return 0
        train, config = args
        load_object(train, "the learner")(config)
