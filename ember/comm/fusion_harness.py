"""The equal-byte harness in shared-context mode: both models read the prompt; what crosses the wire is the
sharer's K/V of the prompt tokens (all but the last), selected and quantized under the cap and packed with
KVWire; the receiver unpacks it and fuses the tokens it received (the fuser works token by token, so a token
not sent keeps the receiver's own K/V exactly).

Methods: `alone` (the receiver reads the prompt), `lora` (the receiver with the LoRA control trained on the
fuser's data reads the prompt: training alone), `projection` (the control that replaces the receiver's cache
by the projection of every sharer token), `text:hint` (the sharer's one-sentence hint appended to the question,
cut to the cap), and `kv:<selection>:<precision>` / `rd:...` under the cap (cap None: every token, so
`kv:front:fp16` at no cap is full fusion).
`proj_vnorm` and `delta_proj_vnorm` score tokens with the fuser on both caches (an oracle ranking: the sharer
alone could not compute the receiver's side).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ember.comm.fusion import FusionExample, engine_pasts, fusion_batch, last_tokens
from ember.comm.harness import method_grid, parse_method
from ember.comm.kv_forward import capture_kv
from ember.comm.text import truncate_utf8, write_hints
from ember.comm.transfer import KVMethod, encode_context
from ember.engine import SamplingParams
from ember.errors import CommError
from ember.kv.wire import unpack
from ember.tasks.evaluate import render

FUSION_METHODS = ("alone", "projection", "text:hint", "lora")
FUSION_CAP_FREE = ("alone", "projection", "lora")  # methods that send nothing under a cap
HINT_WRAPPER = "{question}\n\nHint from another model: {hint}"


class FusionHarness:
    """Runs shared-context methods at caps over examples for engines receiver <- sharer with a fuser."""

    def __init__(self, receiver, sharer, fuser, examples: list[FusionExample], scorers: list, score,
                 max_tokens: int = 16, hint_max_tokens: int = 64, batch_size: int = 16, seed: int = 0,
                 progress: bool | None = None, lora=None):
        """`lora`: the LoRA control (a PEFT folder or LoraAdapter) the `lora` method needs."""
        self.receiver, self.sharer, self.fuser = receiver, sharer, fuser.eval()
        self.lora = lora
        self.examples, self.scorers, self.score = examples, scorers, score
        self.max_tokens, self.hint_max_tokens, self.batch_size, self.seed = max_tokens, hint_max_tokens, batch_size, seed
        self.progress = progress
        self._caches = None
        self._hints = None

    def _prepare(self):
        """Per example: receiver K/V (L_r, 2, H, n-1, D), sharer K/V (L_s, 2, H_s, n-1, D_s), the last prompt
        token, and the sharer's prefill ms."""
        if self._caches is not None:
            return self._caches
        caches = []
        for start in range(0, len(self.examples), self.batch_size):
            chunk = self.examples[start:start + self.batch_size]
            batch = fusion_batch(chunk, self.receiver.tokenizer, self.sharer.tokenizer, self.receiver.device)
            valid = batch.receiver_valid[:, :-1]
            seen = valid & batch.sharer_valid[:, :-1]
            with torch.no_grad():
                mine = capture_kv(self.receiver.model, batch.receiver_ids[:, :-1], valid)
                began = time.perf_counter()
                theirs = capture_kv(self.sharer.model, batch.sharer_ids[:, :-1], seen)
                sharer_ms = 1e3 * (time.perf_counter() - began) / len(chunk)
                theirs = theirs * seen[None, None, :, None, :, None].to(theirs.dtype)
            for row, last in enumerate(last_tokens(batch)):
                keep = valid[row].nonzero()[:, 0]
                caches.append((mine[:, :, row].index_select(3, keep), theirs[:, :, row].index_select(3, keep),
                               last, sharer_ms))
        self._caches = caches
        return caches

    def _fuse(self, mine: torch.Tensor, theirs: torch.Tensor, projection_only: bool = False) -> torch.Tensor:
        """Fused K/V (L_r, 2, H, m, D) of one example's tokens (K/V without the batch axis)."""
        dtype = next(self.fuser.parameters()).dtype
        with torch.no_grad():
            out = self.fuser(mine[:, :, None].to(dtype), theirs[:, :, None].to(dtype), projection_only=projection_only)
        return out[:, :, 0].to(mine.dtype)

    def _scores_inputs(self, mine, theirs, method: KVMethod) -> dict:
        if method.selection not in ("proj_vnorm", "delta_proj_vnorm"):
            return {}
        projected = self._fuse(mine, theirs, projection_only=True)[:, 1]
        if method.selection == "proj_vnorm":
            return {"projected_v": projected}
        return {"projected_v": self._fuse(mine, theirs)[:, 1], "receiver_v": mine[:, 1]}

    def run(self, methods: list[str], caps: list[int | None]) -> list[dict]:
        """Rows for every (method, cap, example); cap None is no cap."""
        parsed = []
        for spec in methods:
            method = spec if spec in FUSION_METHODS else parse_method(spec)
            if isinstance(method, str) and method not in FUSION_METHODS:
                raise CommError(f"shared-context method: expected one of {FUSION_METHODS} or kv:/rd:, found {spec!r}")
            parsed.append((spec, method))
            if method == "lora" and self.lora is None:
                raise CommError("method 'lora': this fuser has no LoRA control (train it with `ember fuser train "
                                "--lora-control`)")
        methods = dict(parsed)
        rows = []
        for spec, cap in tqdm(method_grid(list(methods), caps, FUSION_CAP_FREE), desc="methods x caps",
                              disable=None if self.progress is None else not self.progress):
            rows.extend(self._cell(spec, methods[spec], cap))
        return rows

    def _cell(self, spec: str, method, cap) -> list[dict]:
        rows, prompts, pasts = [], [], []
        plain = method in ("text:hint", "lora")  # the receiver reads a prompt: no fused past
        caches = None if plain else self._prepare()
        for index, example in enumerate(self.examples):
            row = {"item_id": example.item_id, "method": spec, "family": spec.split(":")[0], "cap": cap,
                   "truncated": False, "tokens_sent": 0, "bytes": 0}
            if method == "text:hint":
                prompts.append(self._hint_prompt(index, cap, row))
                pasts.append(None)
            elif method == "lora":
                prompts.append(render(self.receiver.tokenizer, list(example.messages)))
                pasts.append(None)
            else:
                mine, theirs, last, sharer_ms = caches[index]
                row["context_tokens"] = mine.shape[3]
                prompts.append(last)
                pasts.append(self._fused_for(method, mine, theirs, cap, row, sharer_ms))
            rows.append(row)
        sampling = SamplingParams(temperature=0, max_tokens=self.max_tokens)
        began = time.perf_counter()
        if method == "lora":
            result = self._with_lora(prompts, sampling)
        elif method == "text:hint":
            result = self.receiver.generate(prompts, sampling=sampling, progress=False, use_prefix_cache=False)
        else:
            result = self.receiver.generate(prompts, sampling=sampling, progress=False, past=pasts)
        receiver_ms = 1e3 * (time.perf_counter() - began) / len(prompts)
        for row, scorer, out in zip(rows, self.scorers, result.outputs):
            text = out.completions[0].text
            row.update(output=text, correct=bool(self.score(scorer, text)), receiver_ms=receiver_ms)
            row["slack"] = None if cap is None else cap - row["bytes"]
            row["e2e_ms"] = sum(row.get(k, 0.0) for k in ("sharer_ms", "select_ms", "encode_ms", "decode_ms",
                                                            "fuse_ms", "receiver_ms"))
        return rows

    def _with_lora(self, prompts: list[str], sampling):
        """Generate with the LoRA control active, then switch it off again."""
        from ember.comm.lora_control import LORA_NAME

        if LORA_NAME not in self.receiver.adapters:
            self.receiver.load_adapter(self.lora, name=LORA_NAME)
        self.receiver.set_adapter(LORA_NAME)
        try:
            return self.receiver.generate(prompts, sampling=sampling, progress=False, use_prefix_cache=False)
        finally:
            self.receiver.set_adapter(None)

    def _fused_for(self, method, mine, theirs, cap, row: dict, sharer_ms: float):
        """The receiver's past after this method: its own cache, fused where sharer tokens arrived (the
        projection control: every token at fp16, the receiver's cache replaced by the projection)."""
        fused = mine
        if method != "alone":
            projection = method == "projection"
            wire = KVMethod("front", ("fp16",)) if projection else method
            encoded = encode_context(theirs, wire, None if projection else cap, seed=self.seed,
                                     **self._scores_inputs(mine, theirs, wire))
            row.update(bytes=encoded.nbytes, tokens_sent=encoded.tokens_sent, sharer_ms=sharer_ms,
                       select_ms=encoded.select_ms, encode_ms=encoded.encode_ms,
                       **{f"bytes_{k}": v for k, v in encoded.breakdown.items()})
            if encoded.blob is not None:
                began = time.perf_counter()
                decoded = unpack(encoded.blob, device=mine.device)
                received = torch.stack([decoded.k, decoded.v], dim=1)  # (L_s, 2, H_s, m, D_s)
                index = decoded.positions.to(mine.device)
                decoded_at = time.perf_counter()
                fused = mine.clone()
                fused[:, :, :, index] = self._fuse(mine.index_select(3, index), received, projection_only=projection)
                row.update(decode_ms=1e3 * (decoded_at - began), fuse_ms=1e3 * (time.perf_counter() - decoded_at))
        everything = torch.ones(1, fused.shape[3], dtype=torch.bool, device=fused.device)
        return engine_pasts(fused[:, :, None], everything, fused.dtype)[0]

    def _hint_prompt(self, index: int, cap, row: dict) -> str:
        if self._hints is None:
            questions = [ex.messages[-1]["content"] for ex in self.examples]
            hints, timings = write_hints(self.sharer, [""] * len(questions), questions, self.hint_max_tokens)
            self._hints = (hints, 1e3 * timings["total"] / len(questions))
        hints, hint_ms = self._hints
        sent, cut = (hints[index], False) if cap is None else truncate_utf8(hints[index], cap)
        row.update(bytes=len(sent.encode("utf-8")), truncated=cut, message=sent, sharer_ms=hint_ms)
        example = self.examples[index]
        content = HINT_WRAPPER.format(question=example.messages[-1]["content"], hint=sent)
        return render(self.receiver.tokenizer, list(example.messages[:-1]) + [{"role": "user", "content": content}])
