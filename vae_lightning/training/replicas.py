"""Same-shaped jobs (typically the seeds of a sweep) trained as one model: every parameter carries
a leading replica dimension and one ``torch.func.vmap`` runs every job's step at once, while each
job keeps its own initialization, data order, binarization, noise, Adam and divergence guard.

Hand-written because neither Lightning nor torch trains many independent models as one (torch.func
gives the batched forward; the rest, which stream each job draws from and which optimizer steps it,
is what a job alone does). Each job's ``VAEModule`` stays a real module: its parameters are views of
its row of the stacked ones, so its state_dict, its optimizer and its checkpoints are a job's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from vae_lightning.errors import UserError
from vae_lightning.model.objectives import Progress
from vae_lightning.training.module import VAEModule

# a replica's generator state in its job's checkpoints, where a job alone keeps its global
# generator's (``rng_states``) and Lightning's loop state: only ``hydra/launcher=replicas`` continues them
REPLICA_KEY = "replica_generator"


def global_generator(device: torch.device) -> torch.Generator:
    """A generator in the state of ``device``'s global one: what a job alone would draw from next."""
    generator = torch.Generator(device=device)
    if device.type == "cuda":
        generator.set_state(torch.cuda.get_rng_state(device))
    else:
        generator.set_state(torch.get_rng_state())
    return generator


class ReplicaNoise:
    """Each replica's Gaussian draws from its own generator, in the order its job alone makes them
    (a ``model.noise.NoiseSource``). Inside vmap, ``index`` is the batched replica index: indexing
    the stacked draws with it gives each replica its own."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)
        self.index: Tensor | None = None

    def standard_normal(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        draws = [torch.randn(shape, generator=g, device=device, dtype=dtype) for g in self.generators]
        return torch.stack(draws)[self.index]


class _ObjectiveStep(nn.Module):
    """The objective's loss and terms of one job's batch, as a module for ``functional_call``."""

    def __init__(self, module: VAEModule) -> None:
        super().__init__()
        self.model = module.model
        self.objective = module.objective

    def forward(self, x: Tensor, noise: ReplicaNoise, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return self.objective.loss_and_terms(self.model, x, noise, progress)


def objective_of(module: VAEModule) -> tuple:
    """What the modules of one group share besides the model's settings: one vmapped step runs one
    objective with one set of settings."""
    return module.objective.name, sorted(module.objective.settings.items())


def _refusal(modules: Sequence[VAEModule]) -> str | None:
    """Why these modules cannot train as one model, or None."""
    first = modules[0]
    for module in modules[1:]:
        if module.model.settings != first.model.settings:
            differs = next(k for k in first.model.settings if module.model.settings[k] != first.model.settings[k])
            return f"model.{differs} differs between the jobs (it changes the model's shape)"
        if objective_of(module) != objective_of(first):
            return "the jobs' objectives or their settings differ (only lr, the seed and the data protocol may)"
    if any(True for _ in first.model.buffers()):
        return f"the {first.model.settings['net']['name']} net keeps buffers (running statistics)"
    return None


def _linear_weight(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(owner), nn.Linear)


def _set_parameter(model: nn.Module, name: str, value: Tensor) -> None:
    """Replace ``model``'s parameter ``name`` (dotted, as ``named_parameters`` gives it) with ``value``."""
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(value))


def _as_kept(tensor: Tensor, transposed: bool) -> Tensor:
    """A Linear's weight as the replicas keep it, or back (the same view both ways: its last two
    dimensions swapped); any other parameter as it is."""
    return tensor.transpose(-1, -2) if transposed else tensor


@dataclass
class EpochSums:
    """Per replica, the sum of each term over the epoch's images, on the device (no host sync)."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    images: int = 0

    def add(self, terms: dict[str, Tensor]) -> None:
        for term, values in terms.items():  # (replicas, images)
            total = values.detach().float().sum(1)
            self.sums[term] = self.sums[term] + total if term in self.sums else total
        self.images += next(iter(terms.values())).shape[1]

    def means(self) -> dict[str, list[float]]:
        return {term: (total / self.images).tolist() for term, total in self.sums.items()}


class ReplicaGroup:
    """``modules`` (one per job, each built under its own seed) trained as one model, drawing from
    ``generators`` (each in the state its job's global generator had after building it)."""

    def __init__(self, modules: Sequence[VAEModule], generators: Sequence[torch.Generator], steps: int = 0) -> None:
        if (reason := _refusal(modules)) is not None:
            raise UserError(f"these jobs cannot train as one model: {reason}; run them with the basic launcher")
        self.modules = list(modules)
        names = [name for name, _ in modules[0].model.named_parameters()]
        rows = [dict(m.model.named_parameters()) for m in modules]
        # a Linear's weight is kept as (replicas, in, out): batched, its gradient comes out in that
        # layout, and stored as (replicas, out, in) each step would copy it transposed (two such
        # copies cost a third of a step of the reference net); each job's view is its transpose
        self.transposed = {n: _linear_weight(modules[0].model, n) for n in names}
        self.stacked = {n: torch.stack([_as_kept(r[n].detach(), self.transposed[n]) for r in rows]).requires_grad_()
                        for n in names}  # fmt: skip
        self.rows: list[list[tuple[nn.Parameter, str]]] = []  # what each job's Adam steps: its rows, as kept
        self.optimizers = []
        for i, module in enumerate(modules):  # each job's parameters become views of its row
            rows_i = []
            for name in names:
                row = self.stacked[name].detach()[i]
                _set_parameter(module.model, name, _as_kept(row, self.transposed[name]))
                rows_i.append((nn.Parameter(row), name))
            self.rows.append(rows_i)
            # each job's own Adam, as its module makes it, stepping its rows in the kept layout (contiguous:
            # on a transposed view, fused Adam would copy each weight, its gradient and state every step)
            optimizer = module.configure_optimizers()
            optimizer.param_groups[0]["params"] = [row for row, _ in rows_i]
            self.optimizers.append(optimizer)
        self.step_module = _ObjectiveStep(modules[0])
        self.noise = ReplicaNoise(generators)
        self.index = torch.arange(len(modules), device=self.stacked[names[0]].device)
        self.alive = [True] * len(modules)
        self.terms = modules[0].objective.terms
        self.steps = steps  # optimizer steps taken (by the checkpoints continued, too)
        self.ran = False  # a first step has run batched

    def __len__(self) -> int:
        return len(self.modules)

    def _run(self, x: Tensor, x_dim: int | None, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        def one(params: dict[str, Tensor], x_one: Tensor, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            self.noise.index = index
            weights = {f"model.{name}": _as_kept(p, self.transposed[name]) for name, p in params.items()}
            return functional_call(self.step_module, weights, (x_one, self.noise, progress))

        # randomness="same": the draws are made outside the batching, from each replica's generator
        try:
            return vmap(one, in_dims=(0, x_dim, 0), randomness="same")(self.stacked, x, self.index)
        except RuntimeError as err:
            if self.ran:  # it ran batched before: a crash, not these parts
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"these jobs cannot train as one model: torch.func.vmap cannot run their step "
                            f"({first}); run them with the basic launcher") from err  # fmt: skip
        finally:
            self.ran = True

    def train_step(self, x: Tensor, progress: Progress) -> dict[str, Tensor]:
        """One optimizer step of every live replica on its batch ``x[i]``; the per-image terms."""
        self.step_module.train()
        losses, terms = self._run(x, 0, progress)
        losses.sum().backward()  # the replicas share no weight: each gets its own loss's gradient
        for i, (optimizer, views) in enumerate(zip(self.optimizers, self.rows, strict=True)):
            if self.alive[i]:
                for row, name in views:
                    row.grad = self.stacked[name].grad[i]
                optimizer.step()
        for tensor in self.stacked.values():
            tensor.grad = None
        self.steps += 1
        return {term: terms[term] for term in self.terms}

    def optimizer_state(self, index: int) -> dict:
        """Job ``index``'s Adam state as its module's optimizer would give it (a Linear weight's
        moments in the module's layout): its checkpoints hold what a job alone's hold."""
        state = self.optimizers[index].state_dict()
        return {**state, "state": {k: self._moments(index, k, v) for k, v in state["state"].items()}}

    def load_optimizer_state(self, index: int, state: dict) -> None:
        """The inverse of ``optimizer_state``: a job's checkpointed Adam state into its rows."""
        moments = {k: self._moments(index, int(k), v) for k, v in state["state"].items()}
        self.optimizers[index].load_state_dict({**state, "state": moments})

    def _moments(self, index: int, param: int, state: dict) -> dict:
        """A Linear weight's Adam moments turned between the kept layout and its module's (either way)."""
        if not self.transposed[self.rows[index][param][1]]:
            return state
        return {
            k: _as_kept(v, True).contiguous() if isinstance(v, Tensor) and v.dim() == 2 else v for k, v in state.items()
        }

    def release(self) -> None:
        """Give every job's module parameters of its own (contiguous copies of its rows): what it
        is tested, evaluated and reported with is a module like a job alone's."""
        for module in self.modules:
            for name, parameter in list(module.model.named_parameters()):
                _set_parameter(module.model, name, parameter.detach().clone(memory_format=torch.contiguous_format))

    @torch.no_grad()
    def eval_step(self, x: Tensor, x_dim: int | None) -> dict[str, Tensor]:
        self.step_module.eval()
        _, terms = self._run(x, x_dim, Progress())
        return {term: terms[term] for term in self.terms}
