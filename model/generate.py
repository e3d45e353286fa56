"""Prefill and decode with the pre-allocated KV cache, greedy or sampled, with stop tokens.

`Generator` holds the cache and exposes the two steps every backend shares (`prefill(ids) -> logits`,
`decode(token) -> logits`); `generate()` is the one-call API on top of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from model.errors import UserError
from model.gemma3 import Gemma3Model, positions_from_mask
from model.kv_cache import KVCache


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k / top_p filter before sampling; seed makes a run repeatable."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"temperature must be ≥ 0, got {self.temperature}", "use 0 for greedy decoding")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top-k must be ≥ 1, got {self.top_k}", "omit it or pass a positive integer")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}", "omit it or pass e.g. 0.95")


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[batch, vocab] logits → [batch] token ids."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the tokens before it already cover top_p (the first token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= sampling.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _decode_step(model: Gemma3Model, cache: KVCache, token: torch.Tensor, position_ids: torch.Tensor,
                 cache_position: torch.Tensor) -> torch.Tensor:
    hidden = model.hidden_states(token, position_ids=position_ids, cache=cache, cache_position=cache_position)
    return model.lm_head(hidden[:, -1])


class CapturedDecodeStep:
    """The decode step recorded once as a CUDA graph over static input buffers and replayed per token: one
    launch instead of one per kernel (hundreds a step), whose issuing from Python bounds a GPU step of a model
    this small (BENCHMARKS.md, "CUDA"). The cache is updated in place, so its buffers — and so the graph — stay
    valid for the Generator's life; `reset` zeroes them in place."""

    def __init__(self, generator: "Generator", token: torch.Tensor) -> None:
        self.generator = generator
        device = generator.row_positions.device
        self.token = torch.zeros(generator.row_positions.shape[0], 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros_like(self.token)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.set_inputs(token)
        args = (generator.model, generator.cache, self.token, self.position_ids, self.cache_position)
        # Warm-up outside the capture (compiles a compiled step, settles the allocator). Each warm-up step writes
        # this token into the cache, and a sliding layer's ring would then hold it twice for the real step:
        # the cache is put back as it was before the replay runs the real step.
        before = [buffer.clone() for buffer in generator.cache.buffers()]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                generator.decode_step(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = generator.decode_step(*args)
        for buffer, saved in zip(generator.cache.buffers(), before):
            buffer.copy_(saved)

    def set_inputs(self, token: torch.Tensor) -> None:
        self.token.copy_(token.view(-1, 1))
        self.position_ids.copy_(self.generator.row_positions[:, None])
        self.cache_position.fill_(self.generator.position)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.set_inputs(token)
        self.graph.replay()
        return self.logits


class Generator:
    """Cache + step functions for one batch of prompts. Shapes of a decode step never change, so the
    optional `torch.compile` (fullgraph) compiles it once, and on CUDA `cuda_graph` records it once as a CUDA
    graph (at the first decode) and replays it."""

    def __init__(self, model: Gemma3Model, batch_size: int, max_length: int, compile: bool = False,
                 cuda_graph: bool = False) -> None:
        config = model.config
        if max_length > config.context_length:
            raise UserError(f"{max_length} tokens exceed the model's context of {config.context_length}",
                            "shorten the prompt or lower --max-new-tokens")
        parameter = next(model.parameters())
        if cuda_graph and parameter.device.type != "cuda":
            raise UserError(f"CUDA graphs need the model on a CUDA device, it is on {parameter.device}",
                            "run on --device cuda, or leave out --cuda-graph")
        self.cuda_graph = cuda_graph
        self.captured: CapturedDecodeStep | None = None
        self.model = model
        self.max_length = max_length
        self.cache = KVCache(config, batch_size, max_length, dtype=parameter.dtype, device=parameter.device)
        self.decode_step = torch.compile(_decode_step, fullgraph=True, dynamic=False) if compile else _decode_step
        self.position = 0
        self.row_positions = torch.zeros(batch_size, dtype=torch.long, device=parameter.device)

    def reset(self) -> None:
        self.cache.reset()
        self.position = 0
        self.row_positions.zero_()

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt ([batch, seq], left-padded with `attention_mask`) → float32 logits of its last token."""
        check_token_ids(input_ids, self.model.config.vocab_size)
        seq = input_ids.shape[1]
        self._reserve(seq)
        device = self.row_positions.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache_position = torch.arange(self.position, self.position + seq, device=device)
        position_ids = positions_from_mask(attention_mask, seq) + self.row_positions[:, None]
        hidden = self.model.hidden_states(input_ids.to(device), attention_mask.to(device), position_ids,
                                          self.cache, cache_position)
        self.position += seq
        self.row_positions += attention_mask.to(device).long().sum(-1)
        return self.model.lm_head(hidden[:, -1])

    @torch.inference_mode()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([batch]) → float32 logits [batch, vocab] for the next one."""
        self._reserve(1)
        device = self.row_positions.device
        token = token.to(device)
        if self.cuda_graph:
            if self.captured is None:
                self.captured = CapturedDecodeStep(self, token)
            logits = self.captured(token)
        else:
            cache_position = torch.tensor([self.position], device=device)
            logits = self.decode_step(self.model, self.cache, token.view(-1, 1),
                                      self.row_positions[:, None].clone(), cache_position)
        self.position += 1
        self.row_positions += 1
        return logits.clone()

    def _reserve(self, seq: int) -> None:
        if self.position + seq > self.max_length:
            raise UserError(f"{self.position + seq} tokens exceed this generator's cache of {self.max_length}",
                            "allocate the Generator with a larger max_length")


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise UserError(f"token id {int(input_ids.max())} is outside the vocabulary (0..{vocab_size - 1})",
                        "encode prompts with this model's tokenizer")


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [batch, new] new token ids; rows that stopped early are padded with pad_token_id
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [batch, vocab] per step, if asked for
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens * self.tokens.shape[0] / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        decoded = self.tokens.shape[1] - 1  # the first new token comes from the prefill
        return decoded * self.tokens.shape[0] / self.decode_seconds if decoded > 0 and self.decode_seconds else 0.0


def generate(model: Gemma3Model, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int = 32,
             attention_mask: torch.Tensor | None = None, sampling: Sampling = Sampling(),
             stop_token_ids: Sequence[int] | None = None, compile: bool = False,
             return_logits: bool = False, on_tokens: Callable[[torch.Tensor], None] | None = None,
             generator: Generator | None = None, cuda_graph: bool = False) -> GenerationResult:
    """Greedy (default) or sampled generation with the KV cache; stops when every row hit a stop token."""
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    check_generation_length(model, input_ids.shape[1], max_new_tokens)
    config = model.config
    stop = torch.tensor(list(config.eos_token_ids if stop_token_ids is None else stop_token_ids), dtype=torch.long)
    if generator is None:
        generator = Generator(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, compile=compile,
                              cuda_graph=cuda_graph)
    rng = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    result = GenerationResult(tokens=torch.empty(input_ids.shape[0], 0, dtype=torch.long),
                              prompt_tokens=input_ids.shape[1])
    if max_new_tokens == 0:
        return result
    started = time.perf_counter()
    logits = generator.prefill(input_ids, attention_mask)
    result.prefill_seconds = time.perf_counter() - started
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    new_tokens: list[torch.Tensor] = []
    started = time.perf_counter()
    for step in range(max_new_tokens):
        logits = logits.cpu()
        if return_logits:
            result.step_logits.append(logits)
        token = next_tokens(logits, sampling, rng)
        token = torch.where(finished, torch.tensor(config.pad_token_id), token)
        new_tokens.append(token)
        if on_tokens is not None:
            on_tokens(token)
        finished |= torch.isin(token, stop)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = generator.decode(token)
    result.decode_seconds = time.perf_counter() - started
    result.tokens = torch.stack(new_tokens, dim=1)
    return result


def check_generation_length(model: Gemma3Model, prompt_tokens: int, max_new_tokens: int) -> None:
    context = model.config.context_length
    if prompt_tokens == 0:
        raise UserError("the prompt is empty", "pass at least one token (the tokenizer adds <bos>)")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}", "pass a number of tokens to generate")
    if prompt_tokens + max_new_tokens > context:
        raise UserError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                        f"context of {context} tokens", "shorten the prompt or lower --max-new-tokens")
