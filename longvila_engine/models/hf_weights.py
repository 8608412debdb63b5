"""Hugging Face checkpoints in and out: Llama, Qwen2 and Mistral directories (config.json + safetensors).

    model = Transformer.from_hf("path/to/Llama-3-8B", groups, attention_backend="auto")
    model = Transformer.from_hf("path/to/Llama-3-8B", groups, fsdp=True)   # loaded straight into FSDP2 shards
    ...
    model.save_hf("out/")          # collective; rank 0 writes; transformers' from_pretrained loads it

In: `config_from_hf` maps config.json onto a `ModelConfig`; `load_hf_weights` reads, for every
parameter, only this rank's tp slice (`safe_open(...).get_slice(name)[rows]`), so a rank's host memory
peaks near its own tp shard plus one parameter's dense random init (the model is built first, then
overwritten). With FSDP (`from_hf(..., fsdp=True)` = `load_sharded`, what the trainer's `--init-from`
uses when FSDP is on) the model is built on the meta device, FSDP2-sharded over dp_sp, given storage
for its shards only, and each rank reads just the dim-0 rows of its tp slice that its shard holds:
about 1/(dp*sp) of the tp slice read and allocated per rank, never the whole slice.

| engine parameter | transformers tensor | tp split read |
|---|---|---|
| embed.weight | model.embed_tokens.weight | vocabulary rows |
| layers.i.attn_norm.weight / mlp_norm.weight | model.layers.i.input_layernorm / post_attention_layernorm | whole |
| layers.i.attn.{q,k,v}_proj.{weight,bias} | model.layers.i.self_attn.{q,k,v}_proj.* | head rows (K/V whole if tp > K) |
| layers.i.attn.o_proj.weight | model.layers.i.self_attn.o_proj.weight | heads (columns) |
| layers.i.mlp.{gate,up}_proj / down_proj | model.layers.i.mlp.* | FFN rows / columns |
| norm.weight, lm_head.weight | model.norm.weight, lm_head.weight (embed_tokens when tied) | whole / vocabulary rows |

Both use rotate-half RoPE on the same q/k row order, so no permutation is needed.

Refused with a ValueError naming the config field: other architectures, activations other than silu,
rope scaling (`rope_parameters.rope_type` / `rope_scaling`) other than the default, biases the engine
has no place for (Llama `attention_bias` / `mlp_bias`), attention dropout, and a sliding window shorter
than the training length (`max_seq_len`): the engine attends over the whole causal context. Tied
embeddings are supported on the way in (the head starts as a copy of the embedding and trains
untied); the way out always writes an untied `lm_head.weight`.

Out: `save_hf` gathers each parameter (over dp_sp when FSDP-sharded, then over tp) to rank 0, one
at a time, which writes `model-XXXXX-of-YYYYY.safetensors` files of at most `max_shard_bytes` with the
index, and config.json (the source's, when the model came from one, else a Llama/Qwen2 config).
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from .config import ModelConfig

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "read_hf_config",
    "config_from_hf",
    "hf_name",
    "load_hf_weights",
    "load_sharded",
    "from_hf",
    "save_hf",
]

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_hf_config(path: str) -> dict:
    """config.json of the Hugging Face directory `path` (ValueError naming the file when absent/bad)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} is not a Hugging Face model directory: no config.json in it")
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is not readable JSON ({exc})") from exc


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for field, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = spec.get("rope_type", spec.get("type", "default")) if isinstance(spec, dict) else spec
        if kind not in (None, "default"):
            raise ValueError(
                f"config.json {field}.rope_type={kind!r}: the engine implements only the default RoPE "
                f"(theta, no scaling); use a model without rope scaling"
            )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, *, max_seq_len: int | None = None) -> ModelConfig:
    """The `ModelConfig` of a transformers config dict; ValueError naming the unsupported field."""
    archs = hf.get("architectures") or []
    kind = SUPPORTED_ARCHITECTURES.get(archs[0]) if len(archs) == 1 else None
    if kind is None:
        raise ValueError(
            f"config.json architectures={archs!r} is not supported; from_hf reads "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: the engine's MLP is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if kind == "llama" and hf.get(field):
            raise ValueError(f"config.json {field}=true: the engine's Llama has no such biases; not supported")
    if float(hf.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise ValueError(f"config.json attention_dropout={hf['attention_dropout']}: the engine has no dropout")
    window = hf.get("sliding_window")
    if kind == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if window is not None and (max_seq_len is None or max_seq_len > int(window)):
        raise ValueError(
            f"config.json sliding_window={window}: the engine attends over the whole causal context, "
            f"which equals sliding-window attention only for sequences of at most {window} tokens; "
            f"pass max_seq_len <= {window} (the trainer passes --seq-len) or set sliding_window to null"
        )
    heads = int(hf["num_attention_heads"])
    return ModelConfig(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        ffn_hidden_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        rope_theta=_rope_theta(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=kind == "qwen2",
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def hf_name(name: str) -> str:
    """The transformers tensor name of the engine parameter `name`."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name.startswith("lm_head."):
        return name
    parts = name.split(".")  # layers.<i>.<module>.<...>
    if parts[0] != "layers":
        raise ValueError(f"no transformers name for the engine parameter {name!r}")
    rest = ".".join(parts[2:])
    rest = rest.replace("attn_norm.", "input_layernorm.").replace("mlp_norm.", "post_attention_layernorm.")
    rest = rest.replace("attn.", "self_attn.") if rest.startswith("attn.") else rest
    return f"model.layers.{parts[1]}.{rest}"


def _weight_files(path: str) -> dict:
    """{tensor name: safetensors file} of the directory (sharded with an index, or one file)."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    raise ValueError(f"{path!r} holds neither {INDEX} nor {SINGLE}: no safetensors weights to read")


class _Reader:
    """safetensors handles of one HF directory, opened lazily, and the bytes read through them."""

    def __init__(self, path: str, hf: dict):
        self.path, self.files = path, _weight_files(path)
        self.tied = bool(hf.get("tie_word_embeddings", False))
        self.handles: dict = {}
        self.bytes_read = 0

    def view(self, name: str, full: tuple):
        """The lazy safetensors slice of the engine parameter `name`, its shape checked against `full`."""
        from safetensors import safe_open

        key = hf_name(name)
        if key == "lm_head.weight" and key not in self.files and self.tied:
            key = "model.embed_tokens.weight"
        if key not in self.files:
            raise ValueError(f"{self.path!r} has no tensor {key!r} (needed for the engine's {name})")
        file = self.files[key]
        if file not in self.handles:
            if not os.path.isfile(file):
                raise ValueError(f"{file} (listed in {INDEX} for {key!r}) does not exist")
            try:
                self.handles[file] = safe_open(file, framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types for a damaged header
                raise ValueError(f"{file} is not a readable safetensors file ({exc})") from exc
        view = self.handles[file].get_slice(key)
        if tuple(view.get_shape()) != full:
            raise ValueError(
                f"{file}: tensor {key!r} has shape {tuple(view.get_shape())}, the config implies {full}"
            )
        return view

    def read(self, name: str, param, groups, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows `rows` (dim 0, default all) of this rank's tp slice of the parameter `name`; only
        those bytes are read from the file."""
        from ..tensor_parallel.mappings import axis_rank, axis_size

        full = tuple(getattr(param, "tp_full_shape", tuple(param.shape)))
        view = self.view(name, full)
        dim = getattr(param, "tp_dim", None)
        tp_split = dim is not None and axis_size(groups) > 1
        n = full[dim] // axis_size(groups) if tp_split else None
        t0 = axis_rank(groups) * n if tp_split else 0  # first index of the tp slice along `dim`
        if rows is None:
            rows = (0, n if tp_split and dim == 0 else full[0])
        r0, r1 = rows
        if tp_split and dim == 0:
            chunk = view[t0 + r0 : t0 + r1]
        elif tp_split:  # dim 1: this tp rank's columns of rows r0:r1
            chunk = view[r0:r1, t0 : t0 + n]
        else:
            chunk = view[r0:r1]
        self.bytes_read += chunk.numel() * chunk.element_size()
        return chunk

    def close(self) -> None:
        self.handles.clear()


@torch.no_grad()
def load_hf_weights(model, path: str, hf: dict) -> int:
    """Fill every parameter of `model` (plain tp slices, before FSDP) with its slice of the HF tensors;
    returns the bytes read from the files."""
    reader = _Reader(path, hf)
    try:
        for name, param in model.named_parameters():
            param.copy_(reader.read(name, param, model.groups).to(param.dtype))
    finally:
        reader.close()
    return reader.bytes_read


@torch.no_grad()
def load_sharded(
    cls,
    path: str,
    groups,
    *,
    max_seq_len: int | None = None,
    reshard_after_forward: bool = True,
    compute_dtype: torch.dtype | None = None,
    **options,
):
    """A `cls` (Transformer) from the HF directory `path`, FSDP2-sharded over dp_sp, loaded into shards.

    Built on the meta device (no storage, no random init), sharded (`fsdp.shard_model`), given storage
    for this rank's shards only (`fsdp.materialize`), then each parameter's shard is filled with the
    rows it holds of this rank's tp slice, read through `safe_open(...).get_slice(name)[r0:r1, ...]`.
    A rank thus reads and allocates about 1/(dp*sp) of its tp slice (`model.hf_load_stats` records
    `bytes_read`, `tp_slice_bytes` and `shard_bytes`). Collective: every rank of the job calls it.
    `options`: the Transformer's own; `device` (default: the groups' device) is where the shards live.
    """
    from ..fsdp import materialize, shard_model, shard_rows

    if groups is None or not dist.is_initialized():
        raise ValueError("load_sharded (from_hf with fsdp=True) needs initialised process groups")
    hf = read_hf_config(path)
    config = config_from_hf(hf, max_seq_len=max_seq_len)
    device = options.pop("device", None) or groups.device
    model = cls(config, groups, device="meta", **options)
    shard_model(model, groups, reshard_after_forward=reshard_after_forward, compute_dtype=compute_dtype)
    materialize(model, device)
    reader = _Reader(path, hf)
    tp_slice_bytes = shard_bytes = 0
    try:
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            tp_slice_bytes += param.numel() * param.element_size()
            shard_bytes += local.numel() * local.element_size()
            r0, r1 = shard_rows(param)
            if r1 > r0:
                local.copy_(reader.read(name, param, groups, (r0, r1)).to(local.dtype))
    finally:
        reader.close()
    model.hf_config = hf
    model.hf_load_stats = {"bytes_read": reader.bytes_read, "tp_slice_bytes": tp_slice_bytes,
                           "shard_bytes": shard_bytes}  # fmt: skip
    return model


def from_hf(cls, path: str, groups=None, *, max_seq_len: int | None = None, fsdp: bool = False, **options):
    """A `cls` (Transformer) built from the Hugging Face directory `path`, each rank reading its slices.

    `options` are the Transformer's own (attention_backend, tp_sequence_parallel, dtype, device, ...);
    `max_seq_len` is the longest sequence it will see (checked against a sliding window). `fsdp=True`
    returns the model FSDP2-sharded over dp_sp, each rank reading only its shards (`load_sharded`,
    which also takes `reshard_after_forward` and `compute_dtype`).
    """
    if fsdp:
        return load_sharded(cls, path, groups, max_seq_len=max_seq_len, **options)
    hf = read_hf_config(path)
    config = config_from_hf(hf, max_seq_len=max_seq_len)
    model = cls(config, groups, **options)
    model.hf_load_stats = {"bytes_read": load_hf_weights(model, path, hf)}
    model.hf_config = hf
    return model


def _dense(param, groups) -> torch.Tensor:
    """The whole tensor of a parameter, on every rank of its tp group (collective over dp_sp and tp)."""
    from ..tensor_parallel.mappings import axis_size

    t = param.full_tensor() if hasattr(param, "full_tensor") else param.detach()
    dim = getattr(param, "tp_dim", None)
    tp = axis_size(groups)
    if dim is None or tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=groups.tp)
    return torch.cat(parts, dim=dim)


def _hf_config_out(model, dtype: torch.dtype) -> dict:
    c = model.config
    hf = dict(getattr(model, "hf_config", None) or {})
    if not hf:
        arch = "Qwen2ForCausalLM" if c.qkv_bias else "LlamaForCausalLM"
        hf = {"architectures": [arch], "model_type": SUPPORTED_ARCHITECTURES[arch], "hidden_act": "silu"}
        hf["max_position_embeddings"] = 131072
    hf.update(
        num_hidden_layers=c.num_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        intermediate_size=c.ffn_hidden_size,
        vocab_size=c.vocab_size,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=False,  # the engine's head is its own tensor
        dtype=str(dtype).removeprefix("torch."),
    )
    hf.pop("rope_scaling", None)
    hf.pop("torch_dtype", None)
    return hf


def save_hf(model, path: str, *, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as a Hugging Face directory at `path` (collective: every rank calls it; rank 0 writes).

    `dtype`: of the written tensors (default: the parameters'). Files hold at most `max_shard_bytes`.
    """
    from safetensors.torch import save_file

    groups = model.groups
    rank = dist.get_rank() if dist.is_initialized() else 0
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    out_dtype = dtype
    shard: dict = {}
    size, written, weight_map = 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(written) + 1:05d}.safetensors.part"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            written.append((name, list(shard)))
        shard, size = {}, 0

    from ..fsdp import reshard

    reshard(model)  # the sharded parameters carry the tp metadata, the gathered ones do not
    for name, param in model.named_parameters():
        dense = _dense(param, groups)
        if out_dtype is None:
            out_dtype = dense.dtype
        if rank != 0:
            continue
        tensor = dense.detach().to("cpu", out_dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[hf_name(name)] = tensor
        size += nbytes
    if rank == 0:
        flush()
        total = len(written)
        for i, (part, keys) in enumerate(written, start=1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(os.path.join(path, part), os.path.join(path, final))
            weight_map.update({k: final for k in keys})
        total_size = sum(
            os.path.getsize(os.path.join(path, f"model-{i:05d}-of-{total:05d}.safetensors"))
            for i in range(1, total + 1)
        )
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=1)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(_hf_config_out(model, out_dtype), f, indent=1, sort_keys=True)
    if dist.is_initialized():
        dist.barrier()
