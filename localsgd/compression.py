"""Compressed averaging: what a global parameter average sends is the pseudo-gradient θ̄ − θ_k (the
change since the common anchor, never the raw parameters), encoded by a codec.

The mean of n workers' buffers is taken in two stages, so that the bytes each worker sends do not
grow with n (an all-gather of everyone's encoded buffer would send n − 1 of them):

1. Each worker adds its error-feedback residual, cuts the buffer into n chunks, encodes each and
   sends chunk j to the group's j-th worker (all-to-all); the residual becomes what the encoding
   lost. Worker j decodes the n versions of its chunk and sums them in worker order.
2. Worker j encodes the mean of its chunk (with a residual of its own) and every worker gathers all
   n encoded chunks (all-gather) and decodes them.

Each worker sends (n − 1)/n of its encoded buffer in each stage: 2(n − 1)/n in all, as a ring
all-reduce sends of the uncompressed one. Error feedback (Seide et al. 2014; Karimireddy et al.
2019) carries what a lossy encoding dropped into the next round, so the error does not accumulate:
the time-average of the decoded means follows the exact one.

Codecs: ``bf16`` and ``fp16`` (a cast), ``int8`` (per block of ``block_size`` values: a float32
scale max|x|/127 and rounded int8 values) and ``sign`` (per block: the float32 scale mean|x| and one
bit per value, the sign; the scaled-sign compressor of EF-SignSGD).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch

from localsgd._validate import check_int
from localsgd.comm import Communicator
from localsgd.schedule import Level

CodecName = Literal["bf16", "fp16", "int8", "sign"]
CODECS: tuple[str, ...] = get_args(CodecName)
DEFAULT_BLOCK = 256


def _view(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes as ``dtype`` (copied first if they do not start on a multiple of its size)."""
    if data.storage_offset() % dtype.itemsize:
        data = data.clone()
    return data.view(dtype)


class Codec(ABC):
    """Encodes a float32 vector as bytes (a uint8 tensor whose size depends only on the length)."""

    name: str

    @abstractmethod
    def nbytes(self, numel: int) -> int: ...

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor: ...


class Cast(Codec):
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    def nbytes(self, numel: int) -> int:
        return 2 * numel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).view(torch.uint8)

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        return _view(data, self.dtype).float()


class _Blocked(Codec):
    """Per block of ``block_size`` values: a float32 scale and a payload."""

    def __init__(self, block_size: int) -> None:
        self.block_size = check_int("block_size", block_size, 8)

    def blocks(self, numel: int) -> int:
        return math.ceil(numel / self.block_size)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """(blocks, block_size), zero-padded."""
        pad = self.blocks(len(x)) * self.block_size - len(x)
        return torch.nn.functional.pad(x, (0, pad)).view(-1, self.block_size)


class Int8(_Blocked):
    name = "int8"

    def nbytes(self, numel: int) -> int:
        return numel + 4 * self.blocks(numel)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.padded(x)
        scale = blocks.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return torch.cat([scale.view(torch.uint8), q.view(-1)[: len(x)].view(torch.uint8)])

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        head = 4 * self.blocks(numel)
        scale = _view(data[:head], torch.float32)
        q = data[head:].view(torch.int8).float()
        return self.padded(q).mul_(scale[:, None]).view(-1)[:numel]


class Sign(_Blocked):
    name = "sign"

    def nbytes(self, numel: int) -> int:
        return math.ceil(numel / 8) + 4 * self.blocks(numel)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.padded(x)
        counts = torch.full((len(blocks),), float(self.block_size), device=x.device)
        counts[-1] = len(x) - (len(blocks) - 1) * self.block_size  # the last block may be short
        scale = blocks.abs().sum(dim=1) / counts
        bits = (x >= 0).to(torch.uint8)
        bits = torch.nn.functional.pad(bits, (0, (-len(x)) % 8)).view(-1, 8)
        weights = torch.arange(8, device=x.device).exp2().to(torch.uint8)  # made there: no host copy
        packed = (bits * weights).sum(dim=1, dtype=torch.uint8)
        return torch.cat([scale.float().view(torch.uint8), packed])

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        head = 4 * self.blocks(numel)
        scale = _view(data[:head], torch.float32)
        shifts = torch.arange(8, dtype=torch.uint8, device=data.device)
        bits = (data[head:, None] >> shifts) & 1
        signs = bits.view(-1)[:numel].float().mul_(2).sub_(1)
        return self.padded(signs).mul_(scale[:, None]).view(-1)[:numel]


def make_codec(name: str, block_size: int = DEFAULT_BLOCK) -> Codec:
    if name == "bf16":
        return Cast(torch.bfloat16)
    if name == "fp16":
        return Cast(torch.float16)
    if name == "int8":
        return Int8(block_size)
    if name == "sign":
        return Sign(block_size)
    raise ValueError(f"compression must be one of {', '.join(CODECS)}, got {name!r}")


class CompressedMean:
    """The two-stage compressed mean with error feedback at both stages; holds the residuals of
    this process's workers, per flat buffer (``key``)."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.sent: dict[Any, list[torch.Tensor]] = {}  # stage 1: per worker, its whole buffer
        self.owned: dict[Any, list[torch.Tensor]] = {}  # stage 2: per worker, the chunk it owns
        self.members: dict[Any, tuple[int, ...]] = {}  # fault-tolerant: the members ``owned`` is of

    @classmethod
    def of(cls, compression: Codec | str | None, packed: bool) -> CompressedMean | None:
        """The compressed mean for a policy's ``compression`` (None: plain means). It encodes
        whole flat buffers, so it needs the parameters ``packed`` in them."""
        if compression is None:
            return None
        if not packed:
            raise ValueError(
                "compression needs the parameters packed in flat buffers (dense, not sharing memory)"
            )
        return cls(make_codec(compression) if isinstance(compression, str) else compression)

    def mean_(self, comm: Communicator, level: Level, flats: list[torch.Tensor], key: Any) -> int:
        """Replace each local worker's flat buffer by the compressed mean over its group; returns
        the bytes each worker contributed (its encoded buffer)."""
        wait, nbytes = self.start_mean_(comm, level, flats, key)
        wait()
        return nbytes

    @torch.no_grad()
    def start_mean_(
        self, comm: Communicator, level: Level, flats: list[torch.Tensor], key: Any
    ) -> tuple[Callable[[], None], int]:
        """``mean_`` in two parts: encode and start the all-to-all now; the returned function
        waits for it, runs the second stage and writes the means (meanwhile the buffers must not
        be touched). Also returns the bytes.

        In a fault-tolerant round (``comm.round_group``) the chunks go among the round's members
        and the mean is over its contributors. A member that adds nothing (it healed in this round,
        or has no state) sends zeros and starts its chunk's residual from zero; every member's
        second-stage residuals start from zero when the members differ from its last such round
        (its chunk is another one); the first-stage ones are a worker's own and carry on."""
        group = comm.round_group(level)
        numel = flats[0].numel()
        if group is None:
            n, taking, adds, summed = comm.group_size(level), range(len(flats)), [True] * len(flats), None
        else:
            n = len(group.members)
            taking = [i for i, w in enumerate(comm.local_workers) if w in group.members]
            adds = [comm.local_workers[i] in group.contributors for i in taking]
            summed = [group.members.index(w) for w in group.contributors]
        c = math.ceil(numel / n)  # chunk length; the buffer is zero-padded to n * c
        sent = self._residuals(self.sent, key, flats, n * c)
        owned = self._residuals(self.owned, key, flats, c)
        if group is not None and self.members.get(key) != group.members:
            owned[:] = [torch.zeros_like(r) for r in owned]
            self.members[key] = group.members
        encoded = []
        for k, contributes in zip(taking, adds, strict=True):
            v = torch.nn.functional.pad(flats[k].detach().float(), (0, n * c - numel))
            if contributes:
                v.add_(sent[k])
            else:  # it adds nothing: zeros, and no residual of its own in this round
                v.zero_()
                owned[k] = torch.zeros_like(owned[k])
            chunks = [self.codec.encode(chunk) for chunk in v.view(n, c)]
            if contributes:
                decoded = torch.cat([self.codec.decode(e, c) for e in chunks])
                sent[k] = v.sub_(decoded)  # what the encoding lost, sent next time
            encoded.append(chunks)
        receive = comm.start_exchange(level, encoded)

        @torch.no_grad()
        def finish() -> None:
            means = []
            for k, mine in zip(taking, receive(), strict=True):
                parts = mine if summed is None else [mine[j] for j in summed]
                total = self.codec.decode(parts[0], c).clone()
                for e in parts[1:]:
                    total.add_(self.codec.decode(e, c))
                v2 = total.div_(len(parts)).add_(owned[k])
                e2 = self.codec.encode(v2)
                owned[k] = v2.sub_(self.codec.decode(e2, c))
                means.append(e2)
            for k, chunks in zip(taking, comm.gather(level, means), strict=True):
                mean = torch.cat([self.codec.decode(e, c) for e in chunks])[:numel]
                flats[k].copy_(mean.view_as(flats[k]))
            for k in range(len(flats)):  # (a simulated worker outside the round: it gets the mean)
                if k not in taking:
                    flats[k].copy_(flats[taking[0]])

        return finish, n * self.codec.nbytes(c)

    def _residuals(
        self, residuals: dict[Any, list[torch.Tensor]], key: Any, flats: list[torch.Tensor], size: int
    ) -> list[torch.Tensor]:
        """The residuals of ``key``, each ``size`` long (zeros at first; cut or zero-padded when the
        number of members, and so the padding, changed)."""
        kept = residuals.setdefault(key, [torch.zeros(size, device=f.device) for f in flats])
        for k, r in enumerate(kept):
            if r.numel() != size:
                kept[k] = torch.nn.functional.pad(r[:size], (0, max(0, size - r.numel())))
        return kept

    def reset(self, worker: int) -> None:
        """Forget local worker ``worker``'s residuals (a worker healed with another's state: what
        that one's encodings lost is carried by that one)."""
        for residuals in (self.sent, self.owned):
            for kept in residuals.values():
                kept[worker] = torch.zeros_like(kept[worker])

    def describe(self) -> dict[str, Any]:
        """What every worker must agree on."""
        return {"codec": self.codec.name, "block_size": getattr(self.codec, "block_size", None)}

    def state_dict(self) -> dict[str, Any]:
        """The residuals (new tensors replace them at every average, so lists of them are a
        snapshot that later averages do not change)."""
        state: dict[str, Any] = {
            "sent": {k: list(v) for k, v in self.sent.items()},
            "owned": {k: list(v) for k, v in self.owned.items()},
        }
        if self.members:
            state["members"] = dict(self.members)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sent = {k: [t.clone() for t in v] for k, v in state["sent"].items()}
        self.owned = {k: [t.clone() for t in v] for k, v in state["owned"].items()}
        self.members = dict(state.get("members", {}))
