"""The shared decoder: one loop over layers that every family runs, with two sets of ops.

``forward`` (one token) uses the plain-NumPy ops of :mod:`torchless.reference`;
``fast_forward`` (one token) and ``prefill`` (many tokens) use the Numba kernels. What differs
between families is data in :class:`ModelConfig` (norm kind, activation, MLP and residual
layout, q/k norms, soft-caps, windows, RoPE tables) and the tensors present (biases, fused
projections), so the loop below has no family names in it.
"""
from __future__ import annotations

import weakref

import numpy as np

from . import reference as ref
from .config import ModelConfig
from . import ggml_numerics as gn
from .errors import TensorShapeError, TokenError, TorchlessError
from .kernels import batch as kb
from .kernels import decode as kd
from .kernels import matmul as km
from .kernels import moe as kmoe
from .kernels import ops as ko
from .memory import keep_freed_memory
from .state import InferenceState
from .weights import Weight

NORM_CODES = {"rms": ko.NORM_RMS, "rms1p": ko.NORM_RMS1P, "layernorm": ko.NORM_LAYER}
ACT_CODES = {"silu": ko.ACT_SILU, "gelu_tanh": ko.ACT_GELU_TANH, "gelu": ko.ACT_GELU}

BLAS_ATTENTION_MIN_T = 16  # prefill chunks at least this long use BLAS for attention

NORM_NAMES = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "output_norm",
              "attn_q_norm", "attn_k_norm")


def expected_shapes(cfg: ModelConfig) -> dict:
    """The shape of every canonical tensor (``.weight``) for this config."""
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qn, kn = (cfg.q_dim, cfg.kv_dim) if cfg.qk_norm_full else (D, D)
    moe = {}
    if cfg.moe is not None:
        E, Ie = cfg.moe.num_experts, cfg.moe.intermediate_size
        moe = {"ffn_gate_inp": (E, H), "ffn_gate_exps": (E, Ie, H), "ffn_up_exps": (E, Ie, H),
               "ffn_down_exps": (E, H, Ie)}
        Is = cfg.moe.shared_intermediate_size
        if Is:
            moe |= {"ffn_gate_inp_shexp": (1, H), "ffn_gate_shexp": (Is, H),
                    "ffn_up_shexp": (Is, H), "ffn_down_shexp": (H, Is)}
    return moe | {
        "token_embd": (cfg.vocab_size, H),
        "output": (cfg.vocab_size, H),
        "output_norm": (H,),
        "attn_norm": (H,),
        "attn_q": (cfg.q_dim, H),
        "attn_k": (cfg.kv_dim, H),
        "attn_v": (cfg.kv_dim, H),
        "attn_qkv": (cfg.q_dim + 2 * cfg.kv_dim, H),
        "attn_output": (H, cfg.q_dim),
        "attn_q_norm": (qn,),
        "attn_k_norm": (kn,),
        "post_attention_norm": (H,),
        "ffn_norm": (H,),
        "post_ffw_norm": (H,),
        "ffn_gate": (I, H),
        "ffn_up": (I, H),
        "ffn_gate_up": (2 * I, H),
        "ffn_down": (H, I),
    }


class Layer:
    """The tensors of one decoder layer, by canonical name (``None`` where absent)."""

    def __init__(self):
        self.w: dict[str, Weight] = {}
        self.b: dict[str, np.ndarray] = {}  # biases, float32
        self.n: dict[str, np.ndarray] = {}  # norm weights, float32


class DecoderModel:
    """A loaded model: config, weights, tokenizer, and the shared decoder.

    Family classes (``LLaMA``, ``Gemma`` ...) are thin subclasses that only fix the family a
    load must find; a plugin subclasses this when its forward cannot be expressed as config.
    """

    family: str | None = None

    def __init__(self, config: ModelConfig, tensors: dict, tokenizer=None, spec=None,
                 params=None, act_quant: bool | None = None, numerics: str = "torchless"):
        self.config = config
        #: "torchless" (own kernels) or "llama.cpp" (llama.cpp's float order, ggml_numerics.py)
        self.numerics = gn.check_numerics(numerics)
        self.spec = spec
        self.params = params
        self.tokenizer = tokenizer
        keep_freed_memory()  # prefill reuses its intermediate arrays' pages (memory.py)
        # An eager model owns its weights, so it may lay q/k/v (and gate/up) out as one
        # matrix: one kernel call instead of three. A lazy one keeps the file's layout.
        self._assemble(tensors, fuse=(params is None or not params.lazy)
                       and numerics == "torchless")
        #: quantized weights meet 8-bit activations (llama.cpp's way; see kernels.matmul).
        #: Default: on when the model holds block-quantized weights.
        quantized = km.quant_q8.supports(self.output.kind) or any(
            km.quant_q8.supports(w.kind) for layer in self.layers for w in layer.w.values())
        self.act_quant = km.act_quant_default(quantized) if act_quant is None else bool(act_quant)
        if numerics == "llama.cpp":
            if config.moe is not None:
                raise TorchlessError("numerics='llama.cpp' does not cover mixture-of-experts "
                                     "layers")
            if act_quant is False:
                raise TorchlessError("numerics='llama.cpp' quantizes activations as llama.cpp "
                                     "does; it cannot be combined with act_quant=False")
            gn.check_supported(self)
            self.act_quant = True
        self._packed = None  # the per-layer arguments of the fused decode, made on first use

    # ---- the Model protocol ----------------------------------------------------------------
    @property
    def architecture(self):
        from .architecture import ModelArchitecture

        return ModelArchitecture(self.config.architecture)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids) -> str:
        return self._tok().decode(list(ids))

    def forward(self, state: InferenceState, token: int, debug: bool = False) -> np.ndarray:
        """Run one token through the plain-NumPy reference path; sets ``state.logits``."""
        return self._step(state, [token], fast=False, all_logits=False)

    def fast_forward(self, state: InferenceState, token: int, debug: bool = False) -> np.ndarray:
        """Run one token through the Numba kernels; sets ``state.logits``."""
        return self._step(state, [token], fast=True, all_logits=False)

    def prefill(self, state: InferenceState, ids, all_logits: bool = False,
                logits_from: int = 0) -> np.ndarray:
        """Run many tokens as one batch (matrix products per layer) and fill the KV cache.

        Returns the last position's logits ``[V]`` or, with ``all_logits``, ``[T, V]``;
        ``logits_from=k`` (with ``all_logits``) returns only rows ``k..T-1`` and computes the
        output head (and, with llama.cpp numerics, the last layer's MLP) for those rows only,
        as llama.cpp does for the positions a batch asks logits for.
        """
        ids = list(ids)
        if not ids:
            raise ValueError("prefill needs at least one token")
        if not 0 <= logits_from < len(ids):
            raise ValueError(f"logits_from={logits_from} is outside [0, {len(ids)})")
        return self._step(state, ids, fast=True, all_logits=all_logits,
                          logits_from=logits_from if all_logits else 0)

    def decode_batch(self, states, tokens) -> np.ndarray:
        """One decode step for each of several sequences, together: ``tokens[b]`` goes to
        ``states[b]`` (each at its own position, with its own KV cache and limits). Returns
        the logits ``[B, V]`` and updates every state exactly as :meth:`fast_forward` would
        (``logits``, ``pos``, ``tokens``).

        Each weight is read once for all B rows, and every row is computed independently of
        the others in a fixed order: a sequence gets the same logits, bit for bit, whatever
        else is in the batch and however large it is (``kernels/batch.py``). A batch of
        one runs the fused decode of :meth:`fast_forward` (one compiled call per layer),
        whose bits the batched kernels reproduce (tests/test_batch_decode.py).
        """
        states, tokens = list(states), list(tokens)
        if len(states) != len(tokens):
            raise TorchlessError(f"decode_batch got {len(states)} states and {len(tokens)} "
                                 "tokens; give one token per state")
        V = self.config.vocab_size
        if len({id(s) for s in states}) != len(states):
            raise TorchlessError("decode_batch got the same state twice")
        for s in states:
            if not isinstance(s, InferenceState) or s.config is not self.config:
                raise TorchlessError("decode_batch needs states made by this model's new_state()")
        self._check_ids(tokens)
        for s in states:
            s.check_room(1)
        out = np.empty((len(states), V), np.float32)
        rows = []
        alone = len(states) == 1  # the fused decode: the same bits, one call per layer
        for b, (s, t) in enumerate(zip(states, tokens)):
            if alone or self.numerics == "llama.cpp" or self._needs_recompute(s.pos, 1):
                # llama.cpp's float order is defined per sequence; a LongRoPE switch redoes
                # the whole sequence: both go alone (still the same bits as in a batch of 1)
                out[b] = self._step(s, [t], fast=True, all_logits=False)
            else:
                rows.append(b)
        if rows:
            out[rows] = self._batch_step([states[b] for b in rows], [tokens[b] for b in rows])
        return out

    def _batch_step(self, states, tokens) -> np.ndarray:
        cfg = self.config
        B = len(states)
        P = np.array([s.pos for s in states], np.int64)
        for s in states:
            s.cache.ensure(s.pos + 1)
        tables = {}
        for key, rc in cfg.ropes.items():
            rows = [self._rope_tables(s, s.pos, 1)[key] for s in states]
            tables[key] = (np.ascontiguousarray(np.concatenate([r[0] for r in rows])),
                           np.ascontiguousarray(np.concatenate([r[1] for r in rows])),
                           rc.rotary_dim)
        logn = np.ones(B, np.float32)
        if cfg.logn_seq_length:
            pos1 = P.astype(np.float64) + 1
            logn = np.where(pos1 > cfg.logn_seq_length,
                            np.log(pos1) / np.log(cfg.logn_seq_length), 1.0).astype(np.float32)
        ops = _BATCH_OPS[self.act_quant]
        x = np.ascontiguousarray(self.embed.rows_f32(np.asarray(tokens)), dtype=np.float32)
        if self._embed_scale is not None:
            x *= self._embed_scale
        slots = _Slots(states, P)
        for i, layer in enumerate(self.layers):
            x = self._layer(ops, layer, i, x, slots, P, tables[cfg.layer_rope[i]], logn)
        h = ops.norm(x, cfg.norm, self.final_norm[0], self.final_norm[1], cfg.norm_eps)
        logits = ops.linear(h, self.output, self.output_bias)
        if cfg.final_softcap:
            kb.softcap_rows(logits, np.float32(cfg.final_softcap))
        for b, s in enumerate(states):
            row = logits[b]
            s.pos += 1
            s.tokens.append(int(tokens[b]))
            s.logits = row.copy()
        return logits

    def forward_tokens(self, state: InferenceState, ids, all_logits: bool = True) -> np.ndarray:
        """The reference path over many tokens at once (used by tests and ``prefill`` checks)."""
        return self._step(state, list(ids), fast=False, all_logits=all_logits)

    # ---- assembling -------------------------------------------------------------------------
    def _assemble(self, tensors: dict, fuse: bool = False) -> None:
        cfg = self.config
        shapes = expected_shapes(cfg)
        for name, w in tensors.items():
            base, _, suffix = name.rpartition(".")
            canon = base.split(".")[-1]
            if canon not in shapes:
                continue
            want = shapes[canon] if suffix == "weight" else (shapes[canon][0],)
            if tuple(w.shape) != tuple(want):
                raise TensorShapeError(
                    f"tensor {getattr(w, 'source', w.name)!r} ({canon}.{suffix}) has shape "
                    f"{list(w.shape)}, expected {list(want)}"
                )
        self.embed = tensors["token_embd.weight"]
        self.output = tensors.get("output.weight") or self.embed
        self.output_bias = _f32(tensors.get("output.bias"))
        self.final_norm = (_f32(tensors["output_norm.weight"]),
                           _f32(tensors.get("output_norm.bias")))
        self.layers = []
        for i in range(cfg.num_layers):
            layer = Layer()
            prefix = f"blk.{i}."
            for name, w in tensors.items():
                if not name.startswith(prefix):
                    continue
                canon, _, suffix = name[len(prefix):].rpartition(".")
                if canon in NORM_NAMES:
                    (layer.n if suffix == "weight" else layer.b)[canon] = _f32(w)
                elif suffix == "bias":
                    layer.b[canon] = _f32(w)
                else:
                    layer.w[canon] = w
            if fuse:
                _fuse(layer, ("attn_q", "attn_k", "attn_v"), "attn_qkv")
                _fuse(layer, ("ffn_gate", "ffn_up"), "ffn_gate_up")
            self.layers.append(layer)
        scale = cfg.embed_scale
        if scale is not None:
            # Gemma: sqrt(hidden) rounded to the dtype the embedding is stored in.
            if self.embed.kind == "bf16":
                from .weights import bf16_to_f32, f32_to_bf16

                scale = float(bf16_to_f32(f32_to_bf16(np.array([scale], np.float32)))[0])
            elif self.embed.kind == "f16":
                scale = float(np.float16(scale))
        self._embed_scale = None if scale is None else np.float32(scale)

    # ---- the decoder ------------------------------------------------------------------------
    def _check_ids(self, ids) -> None:
        V = self.config.vocab_size
        for t in ids:
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < V:
                raise TokenError(f"token id {t!r} is outside the vocabulary [0, {V})")

    def _rope_tables(self, state: InferenceState, P: int, T: int) -> dict:
        tables = {}
        positions = np.arange(P, P + T)
        for key, rc in self.config.ropes.items():
            S = P + T
            if rc.rope_type == "qwen_ntk":
                if P == 0:
                    state.rope_fixed_len[key] = S
                S = state.rope_fixed_len.get(key, S)
            inv, factor = rc.table(S)
            cos, sin = ref.rope_angles(positions, inv, factor)
            tables[key] = (cos, sin, rc.rotary_dim)
        return tables

    def _needs_recompute(self, P: int, T: int) -> bool:
        """LongRoPE switching from short to long factors: the cached keys must be redone."""
        if P == 0:
            return False
        for rc in self.config.ropes.values():
            if rc.rope_type == "longrope" and rc.regime(P + T) != rc.regime(P):
                return True
        return False

    def _step(self, state: InferenceState, ids, fast: bool, all_logits: bool,
              logits_from: int = 0) -> np.ndarray:
        self._check_ids(ids)
        state.check_room(len(ids))
        P = state.pos
        if self._needs_recompute(P, len(ids)):
            history = state.tokens[:P]
            state.reset()
            out = self._step(state, history + list(ids), fast, all_logits,
                             P + logits_from if all_logits else 0)
            if all_logits:
                return out
            return out
        cfg = self.config
        T = len(ids)
        state.cache.ensure(P + T)
        ggml = self.numerics == "llama.cpp"
        if ggml:
            tables = gn.rope_tables(cfg, np.arange(P, P + T))
        else:
            tables = self._rope_tables(state, P, T)
        logn = np.ones(T, np.float32)
        if cfg.logn_seq_length:
            pos1 = np.arange(P, P + T, dtype=np.float64) + 1
            logn = np.where(pos1 > cfg.logn_seq_length,
                            np.log(pos1) / np.log(cfg.logn_seq_length), 1.0).astype(np.float32)
        ops = gn.GgmlOps if ggml else _OPS[fast, self.act_quant]
        x = self.embed.rows_f32(np.asarray(ids))
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._embed_scale is not None:
            x *= self._embed_scale
        packed = self._decode_pack() if fast and T == 1 and not ggml else None
        if packed:
            # decode: one compiled call per layer (kernels/decode.py), same math as _layer
            xv = x[0].copy()
            for i, args in enumerate(packed[0]):
                cos, sin, _ = tables[cfg.layer_rope[i]]
                if packed[2][i] is None:
                    kd.decode_layer(xv, *args, state.cache.k[i], state.cache.v[i], P, cos, sin,
                                    logn)
                else:  # a mixture of experts: only the chosen experts' rows are read
                    kmoe.decode_layer_moe(xv, *args, state.cache.k[i], state.cache.v[i], P,
                                          cos, sin, logn, *packed[2][i])
            logits = np.empty((1, cfg.vocab_size), np.float32)
            kd.decode_head(xv, *packed[1], logits[0])
        else:
            for i, layer in enumerate(self.layers):
                # llama.cpp keeps only the output rows past the last layer's attention
                # (inp_out_ids), so its last MLP sums as for one row when one is wanted
                keep = T - 1 if not all_logits else logits_from
                kw = ({"keep_from": keep} if ggml and keep and i == len(self.layers) - 1
                      else {})
                x = self._layer(ops, layer, i, x, state, P, tables[cfg.layer_rope[i]], logn,
                                **kw)
            if not all_logits:
                x = x[-1:]
            elif logits_from and x.shape[0] == T:
                x = x[logits_from:]
            h = ops.norm(x, cfg.norm, self.final_norm[0], self.final_norm[1], cfg.norm_eps)
            logits = ops.linear(h, self.output, self.output_bias)
            if cfg.final_softcap:
                c = np.float32(cfg.final_softcap)
                logits = (c * np.tanh(logits / c)).astype(np.float32)
        state.pos = P + T
        state.tokens.extend(int(t) for t in ids)
        state.logits = np.ascontiguousarray(logits[-1], dtype=np.float32)
        return logits if all_logits else state.logits

    def _decode_pack(self):
        """The arguments :func:`kernels.decode.decode_layer` takes for each layer, and those of
        ``decode_head``; ``False`` when a layer holds a tensor the fused decode has no slot
        for (such a model decodes through the per-op path)."""
        if self._packed is not None:
            return self._packed
        cfg = self.config
        icfg_common = {
            kd.C_NORM: NORM_CODES[cfg.norm],
            kd.C_QK_NORM: NORM_CODES[cfg.qk_norm] if cfg.qk_norm else -1,
            kd.C_RESIDUAL: {"sequential": kd.RES_SEQUENTIAL, "parallel": kd.RES_PARALLEL,
                            "sandwich": kd.RES_SANDWICH}[cfg.residual],
            kd.C_MLP: kd.MLP_DENSE if cfg.mlp == "dense" else kd.MLP_GATED,
            kd.C_ACT: ACT_CODES[cfg.activation],
            kd.C_NH: cfg.num_heads, kd.C_NKV: cfg.num_kv_heads, kd.C_D: cfg.head_dim,
            kd.C_ACT_QUANT: int(self.act_quant), kd.C_INTER: cfg.intermediate_size,
            kd.C_PAR_ATTN: kd.PARALLEL_ATTENTION_WORK,
        }
        fcfg = kd.f32_vector([cfg.norm_eps, cfg.attn_scale, cfg.attn_softcap or 0.0])
        layers, moe = [], []
        for i, layer in enumerate(self.layers):
            kinds = np.full(7, kd.NONE, np.int64)
            ws, bs = [kd.weight_bytes(None)[1]] * 7, [kd.f32_vector(None)] * 7
            if "ffn_gate_inp" in layer.w:
                if cfg.residual != "sequential" or any(
                        n in layer.b for n in kmoe.MOE_TENSORS):
                    self._packed = False
                    return False
                moe.append(kmoe.pack_layer(layer, cfg, ACT_CODES[cfg.activation],
                                           self.act_quant) + kmoe.pack_shared(layer))
            else:
                moe.append(None)
            for name, w in layer.w.items():
                if name in kmoe.MOE_TENSORS:
                    continue
                slot = kd.FUSED_SLOTS.get(name)
                if slot is None:
                    if name not in kd.SLOT_NAMES:
                        self._packed = False
                        return False
                    slot = kd.SLOT_NAMES.index(name)
                kinds[slot], ws[slot] = kd.weight_bytes(w)
                bs[slot] = kd.f32_vector(layer.b.get(name))
            ns, nbs = [], []
            for name in kd.NORM_SLOTS:
                w = layer.n.get(name)
                ns.append(kd.f32_vector(w))
                nbs.append(kd.f32_vector(layer.b.get(name), None if w is None else len(w)))
            icfg = np.zeros(kd.N_ICFG, np.int64)
            for key, val in icfg_common.items():
                icfg[key] = val
            icfg[kd.C_WINDOW] = cfg.layer_windows[i] or 0
            icfg[kd.C_ROT] = cfg.ropes[cfg.layer_rope[i]].rotary_dim
            icfg[kd.C_QKV_FUSED] = "attn_qkv" in layer.w
            icfg[kd.C_GU_FUSED] = "ffn_gate_up" in layer.w
            icfg[kd.C_QK_FULL] = cfg.qk_norm_full
            layers.append((tuple(ws), kinds, tuple(bs), tuple(ns), tuple(nbs), icfg, fcfg))
        kind, wb = kd.weight_bytes(self.output)
        head = (kd.f32_vector(self.final_norm[0]),
                kd.f32_vector(self.final_norm[1], len(self.final_norm[0])),
                NORM_CODES[cfg.norm], np.float32(cfg.norm_eps), kind, wb,
                kd.f32_vector(self.output_bias), np.float32(cfg.final_softcap or 0.0),
                self.act_quant)
        self._packed = (layers, head, moe)
        return self._packed

    def _layer(self, ops, layer: Layer, i: int, x, state, P, rope_table, logn,
               keep_from: int = 0):
        cfg = self.config
        T = x.shape[0]
        nH, nKV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = ops.norm(x, cfg.norm, layer.n["attn_norm"], layer.b.get("attn_norm"), cfg.norm_eps)
        if "attn_qkv" in layer.w:
            qkv = ops.linear(h, layer.w["attn_qkv"], layer.b.get("attn_qkv"))
            q = qkv[:, : cfg.q_dim]
            k = qkv[:, cfg.q_dim : cfg.q_dim + cfg.kv_dim]
            v = qkv[:, cfg.q_dim + cfg.kv_dim :]
        else:
            q = ops.linear(h, layer.w["attn_q"], layer.b.get("attn_q"))
            k = ops.linear(h, layer.w["attn_k"], layer.b.get("attn_k"))
            v = ops.linear(h, layer.w["attn_v"], layer.b.get("attn_v"))
        q = np.ascontiguousarray(q).reshape(T, nH, D)
        k = np.ascontiguousarray(k).reshape(T, nKV, D)
        v = np.ascontiguousarray(v).reshape(T, nKV, D)
        if cfg.qk_norm and cfg.qk_norm_full:  # over the whole projection (OLMoE)
            q = ops.norm(q.reshape(T, nH * D), cfg.qk_norm, layer.n["attn_q_norm"],
                         layer.b.get("attn_q_norm"), cfg.norm_eps).reshape(T, nH, D)
            k = ops.norm(k.reshape(T, nKV * D), cfg.qk_norm, layer.n["attn_k_norm"],
                         layer.b.get("attn_k_norm"), cfg.norm_eps).reshape(T, nKV, D)
        elif cfg.qk_norm:
            q = ops.norm(q.reshape(T * nH, D), cfg.qk_norm, layer.n["attn_q_norm"],
                         layer.b.get("attn_q_norm"), cfg.norm_eps).reshape(T, nH, D)
            k = ops.norm(k.reshape(T * nKV, D), cfg.qk_norm, layer.n["attn_k_norm"],
                         layer.b.get("attn_k_norm"), cfg.norm_eps).reshape(T, nKV, D)
        cos, sin, rot = rope_table
        q = ops.rope(q, cos, sin, rot)
        k = ops.rope(k, cos, sin, rot)
        if ops is gn.GgmlOps:
            k, v = ops.kv(k), ops.kv(v)
        a = self._attention(ops, q, k, v, i, state, P, logn)
        a = ops.linear(a.reshape(T, nH * D), layer.w["attn_output"], layer.b.get("attn_output"))
        if keep_from:
            a, x, h = a[keep_from:], x[keep_from:], h[keep_from:]
        if cfg.residual == "parallel":
            return x + a + self._mlp(ops, layer, h)
        if cfg.residual == "sandwich":
            x = x + ops.norm(a, cfg.norm, layer.n["post_attention_norm"],
                             layer.b.get("post_attention_norm"), cfg.norm_eps)
            h = ops.norm(x, cfg.norm, layer.n["ffn_norm"], layer.b.get("ffn_norm"), cfg.norm_eps)
            m = self._mlp(ops, layer, h)
            return x + ops.norm(m, cfg.norm, layer.n["post_ffw_norm"],
                                layer.b.get("post_ffw_norm"), cfg.norm_eps)
        x = x + a
        h = ops.norm(x, cfg.norm, layer.n["ffn_norm"], layer.b.get("ffn_norm"), cfg.norm_eps)
        return x + self._mlp(ops, layer, h)

    def _attention(self, ops, q, k, v, i: int, state, P, logn):
        """Store this layer's keys/values in the cache and attend; ``state`` is one
        :class:`InferenceState` (rows = positions ``P..``) or a :class:`_Slots` (row b = one
        token of sequence b at its own position, in its own cache)."""
        cfg = self.config
        window = cfg.layer_windows[i] or 0
        if isinstance(state, _Slots):
            return ops.slot_attention(q, k, v, state, i, cfg.attn_scale,
                                      cfg.attn_softcap or 0.0, window, logn)
        T = q.shape[0]
        kc, vc = state.cache.k[i], state.cache.v[i]
        kc[:, P : P + T] = k.transpose(1, 0, 2)
        vc[:, P : P + T] = v.transpose(1, 0, 2)
        return ops.attention(q, kc, vc, P, cfg.attn_scale, cfg.attn_softcap or 0.0, window,
                             logn)

    def _mlp(self, ops, layer: Layer, h):
        cfg = self.config
        if "ffn_gate_inp" in layer.w:  # a mixture of experts (kernels/moe.py)
            out = ops.moe(h, layer, cfg)
            if "ffn_gate_inp_shexp" in layer.w:  # + the shared expert, sigmoid-gated
                g = ops.linear(h, layer.w["ffn_gate_shexp"], None)
                u = ops.linear(h, layer.w["ffn_up_shexp"], None)
                y = ops.linear(ops.gated(g, u, cfg.activation), layer.w["ffn_down_shexp"], None)
                s = ops.linear(h, layer.w["ffn_gate_inp_shexp"], None)
                out = out + y * (np.float32(1) / (np.float32(1) + np.exp(-s)))
            return out
        if cfg.mlp == "dense":
            u = ops.linear(h, layer.w["ffn_up"], layer.b.get("ffn_up"))
            return ops.linear(ops.act(u, cfg.activation), layer.w["ffn_down"],
                              layer.b.get("ffn_down"))
        if "ffn_gate_up" in layer.w:
            gu = ops.linear(h, layer.w["ffn_gate_up"], layer.b.get("ffn_gate_up"))
            a = ops.gated_fused(gu, cfg.activation)
        else:
            g = ops.linear(h, layer.w["ffn_gate"], layer.b.get("ffn_gate"))
            u = ops.linear(h, layer.w["ffn_up"], layer.b.get("ffn_up"))
            a = ops.gated(g, u, cfg.activation)
        return ops.linear(a, layer.w["ffn_down"], layer.b.get("ffn_down"))

    # ---- generation -------------------------------------------------------------------------
    def _tok(self):
        if self.tokenizer is None:
            from .errors import TorchlessError

            raise TorchlessError("this model has no tokenizer (no tokenizer.json); pass token ids")
        return self.tokenizer

    def new_state(self, max_seq_len: int | None = None) -> InferenceState:
        return InferenceState(self.config, max_seq_len=max_seq_len)

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop=None, state: InferenceState | None = None,
                 ignore_eos: bool = False) -> list[int]:
        """Generate up to ``max_new_tokens`` ids after ``prompt`` (a string or token ids).

        Greedy at ``temperature=0``. Stops after an end-of-sequence id (which is included, as
        transformers does) or once the text contains one of ``stop`` (str or list of str).
        """
        from .generation import generate_ids

        return [t for t, _ in generate_ids(self, prompt, max_new_tokens, temperature, top_k,
                                           top_p, min_p, repetition_penalty, seed, stop, state,
                                           ignore_eos) if t is not None]

    def generate_batch(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None,
                       min_p: float | None = None, repetition_penalty: float = 1.0,
                       seed=None, stop=None, states=None,
                       ignore_eos: bool = False) -> list[list[int]]:
        """:meth:`generate` for several prompts (strings or id lists, any lengths), decoded
        together one batched step per token (:meth:`decode_batch`); returns each prompt's
        new ids. ``seed``: an int (each sequence seeded as ``generate`` would be) or one per
        prompt. ``states``: one per prompt to reuse (their cached prefixes are kept)."""
        from .generation import generate_batch

        return generate_batch(self, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                              repetition_penalty, seed, stop, states, ignore_eos)

    def stream(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None,
               min_p: float | None = None, repetition_penalty: float = 1.0,
               seed: int | None = None, stop=None, state: InferenceState | None = None,
               ignore_eos: bool = False):
        """Like :meth:`generate` but yields decoded text pieces as they are produced."""
        from .generation import generate_ids

        for _, piece in generate_ids(self, prompt, max_new_tokens, temperature, top_k, top_p,
                                     min_p, repetition_penalty, seed, stop, state, ignore_eos,
                                     want_text=True):
            if piece:
                yield piece


def _fuse(layer: Layer, parts: tuple, fused: str) -> None:
    """Concatenate same-kind weights row-wise (and their biases) into one fused weight."""
    ws = [layer.w.get(p) for p in parts]
    if any(w is None for w in ws) or len({w.kind for w in ws}) != 1 or fused in layer.w:
        return
    if any(w.data.ndim != 2 for w in ws) or len({w.data.shape[1] for w in ws}) != 1:
        return
    data = np.concatenate([w.data for w in ws], axis=0)
    shape = (sum(w.shape[0] for w in ws), ws[0].shape[1])
    layer.w[fused] = Weight(fused, ws[0].kind, shape, data)
    biases = [layer.b.get(p) for p in parts]
    if any(b is not None for b in biases):
        layer.b[fused] = np.concatenate([
            b if b is not None else np.zeros(w.shape[0], np.float32) for b, w in zip(biases, ws)])
    for p in parts:
        layer.w.pop(p)
        layer.b.pop(p, None)


_ZEROS: dict = {}


def _zeros(n: int) -> np.ndarray:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = np.zeros(n, np.float32)
    return z


def _f32(w):
    if w is None:
        return None
    return np.ascontiguousarray(w.to_f32() if isinstance(w, Weight) else w, dtype=np.float32)


class _RefOps:
    """The reference: plain NumPy."""

    def __init__(self, act_quant: bool = False):
        self.act_quant = act_quant

    def linear(self, x, w, b):
        return ref.linear(x, w, None if b is None else Weight("bias", "f32", b.shape, b),
                          self.act_quant)

    @staticmethod
    def norm(x, kind, w, b, eps):
        return ref.norm(x, kind, w, b, eps)

    @staticmethod
    def act(x, kind):
        return ref.activation(x, kind).astype(np.float32)

    @staticmethod
    def gated(g, u, kind):
        return (ref.activation(g, kind) * u).astype(np.float32)

    @classmethod
    def gated_fused(cls, gu, kind):
        n = gu.shape[1] // 2
        return cls.gated(gu[:, :n], gu[:, n:], kind)

    @staticmethod
    def rope(x, cos, sin, rot):
        return ref.rope(x, cos, sin, rot)

    def moe(self, h, layer, cfg):
        m = cfg.moe
        return ref.moe(h, layer.w["ffn_gate_inp"], layer.w["ffn_gate_exps"],
                       layer.w["ffn_up_exps"], layer.w["ffn_down_exps"], m.top_k, m.router,
                       m.renorm, cfg.activation, self.act_quant)

    @staticmethod
    def attention(q, k_cache, v_cache, P, scale, softcap, window, logn):
        S = P + q.shape[0]
        return ref.attention(q, k_cache[:, :S], v_cache[:, :S], P, scale, softcap, window, logn)


class _FastOps:
    """The same operations through the Numba kernels."""

    def __init__(self, act_quant: bool = False):
        self.act_quant = act_quant
        self._memo = (None, None, None)  # (weakref to x, activation format, round trip)
        self._acts = kb.ActCache()

    def linear(self, x, w, b):
        x = np.ascontiguousarray(x, dtype=np.float32)
        T = x.shape[0]
        if self.act_quant and 1 < T <= kb.short_rows(w.kind):
            # a short chunk: 8-bit activations against the weight's blocks, each block read
            # once for all rows (the decode's row products); longer ones widen the weight to
            # float32 tile by tile for BLAS, whose fixed cost a short prompt does not repay
            out = kb.linear_rows(w, x, True, self._acts)
        elif self.act_quant and T > 1 and km.quant_q8.supports(w.kind):
            # batched: the activations' 8-bit round trip, once per input (q, k and v share it)
            fmt = km.quant_q8.ACT_FORMAT[w.kind] == "q8_k"  # q8_0 and q8_1: the same x
            ref_x, memo_fmt, deq = self._memo
            if ref_x is None or ref_x() is not x or memo_fmt != fmt:
                deq = km.quant_q8.dequantized_activations(w.kind, x)
                self._memo = (weakref.ref(x), fmt, deq)
            out = km.matmul(w, deq)
        else:
            out = km.matmul(w, x, act_quant=self.act_quant)
        if b is not None:
            out += b
        return out

    @staticmethod
    def norm(x, kind, w, b, eps):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        kernel = ko.norm_rows if x.shape[0] * x.shape[1] > 65536 else ko.norm_rows_serial
        if b is None:
            b = _zeros(w.shape[0])
        kernel(x, w, b, np.float32(eps), NORM_CODES[kind], out)
        return out

    @staticmethod
    def act(x, kind):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        kernel = ko.gated_act if x.size > 65536 else ko.gated_act_serial
        kernel(x, np.ones_like(x), ACT_CODES[kind], out)
        return out

    @staticmethod
    def gated(g, u, kind):
        g = np.ascontiguousarray(g, dtype=np.float32)
        u = np.ascontiguousarray(u, dtype=np.float32)
        out = np.empty_like(g)
        kernel = ko.gated_act if g.size > 65536 else ko.gated_act_serial
        kernel(g, u, ACT_CODES[kind], out)
        return out

    @staticmethod
    def gated_fused(gu, kind):
        gu = np.ascontiguousarray(gu, dtype=np.float32)
        out = np.empty((gu.shape[0], gu.shape[1] // 2), np.float32)
        kernel = ko.gated_act_fused if out.size > 65536 else ko.gated_act_fused_serial
        kernel(gu, ACT_CODES[kind], out)
        return out

    def moe(self, h, layer, cfg):
        h = np.ascontiguousarray(h, dtype=np.float32)
        act = ACT_CODES[cfg.activation]
        if h.shape[0] == 1:  # decode outside the fused path: the chosen experts only
            out = np.empty_like(h)
            kmoe.decode_moe(h[0], *kmoe.pack_layer(layer, cfg, act, self.act_quant), out[0])
            return out
        logits = self.linear(h, layer.w["ffn_gate_inp"], None)
        return kmoe.prefill_moe(h, layer, cfg, act, self.act_quant, logits)

    @staticmethod
    def rope(x, cos, sin, rot):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if rot:
            kernel = ko.rope_rows if x.size > 65536 else ko.rope_rows_serial
            kernel(x, cos, sin, rot)
        return x

    @staticmethod
    def attention(q, k_cache, v_cache, P, scale, softcap, window, logn):
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.shape[0] >= BLAS_ATTENTION_MIN_T:
            return ko.attention_blas(q, k_cache, v_cache, P, scale, softcap, int(window), logn)
        out = np.empty_like(q)
        work = q.shape[0] * q.shape[1] * q.shape[2] * (P + q.shape[0])
        kernel = ko.attention if work > 1 << 18 else ko.attention_serial
        kernel(q, k_cache, v_cache, P, np.float32(scale), np.float32(softcap), int(window),
               logn, out)
        return out


class _Slots:
    """The sequences of one batched decode step: their positions and, per layer, the
    addresses of their KV caches (``kernels.batch.attention_slots`` takes them)."""

    def __init__(self, states, pos):
        self.states = states
        self.pos = pos
        self.caps = np.array([s.cache.capacity for s in states], np.int64)
        addrs = np.stack([s.cache.addrs for s in states], axis=2)  # [k|v, layer, row]
        self.kaddr = np.ascontiguousarray(addrs[0])
        self.vaddr = np.ascontiguousarray(addrs[1])


class _BatchOps(_FastOps):
    """The Numba ops for a batch of sequences (one row each): products whose rows do not
    depend on one another (``kernels.batch``) and attention over one cache per row."""

    def linear(self, x, w, b):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = kb.linear_rows(w, x, self.act_quant, self._acts)
        if b is not None:
            out += b
        return out

    @staticmethod
    def slot_attention(q, k, v, slots, i, scale, softcap, window, logn):
        q = np.ascontiguousarray(q, dtype=np.float32)
        k = np.ascontiguousarray(k, dtype=np.float32)
        v = np.ascontiguousarray(v, dtype=np.float32)
        out = np.empty_like(q)
        # forked when there is enough work or enough (row, head) jobs to share: with 8 rows
        # of 9 heads the parallel loop took 9 against 16 us at position 6, 44 against 83 at
        # position 100 (Zen 5)
        work = q.shape[1] * q.shape[2] * int(slots.pos.sum() + len(slots.pos))
        jobs = q.shape[0] * q.shape[1]
        kb.attention_slots(q, k, v, slots.kaddr[i], slots.vaddr[i], slots.caps, slots.pos,
                           np.float32(scale), np.float32(softcap), int(window), logn, out,
                           work > kd.PARALLEL_ATTENTION_WORK or jobs >= 16)
        return out


_BATCH_OPS = {aq: _BatchOps(aq) for aq in (False, True)}

_OPS = {(fast, aq): (_FastOps if fast else _RefOps)(aq)
        for fast in (False, True) for aq in (False, True)}
