"""The settings that bound training memory: their checks, their set-up, and the hint an
out-of-memory error gets (README "GPUs and memory").

    train.max_device_tokens        tokens per packed row on one device (more accumulation, same gradient)
    train.gradient_checkpointing   recompute each layer's activations in the backward
    train.loss_chunk_tokens        the loss over the vocabulary a chunk of tokens at a time
"""
from __future__ import annotations

from phitune.errors import PhituneError

OOM_HINT = ("lower train.max_device_tokens (tokens per forward pass) "
            "or set train.gradient_checkpointing=true")
CPU_ALLOCATOR = "DefaultCPUAllocator"  # torch's host allocator: its failures are RuntimeErrors


def check_settings(train_cfg, longest: int, max_len: int) -> None:
    """Before any model is built: positive sizes, and a row that holds the longest example."""
    from phitune.train.forward import autocast_dtype

    for key in ("max_device_tokens", "loss_chunk_tokens"):
        v = train_cfg.get(key)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise PhituneError(f"train.{key}={v!r}: expected a positive number of tokens or null")
    autocast_dtype(train_cfg.get("mixed_precision", "off"), "cpu")  # a bad name fails here
    cap = train_cfg.get("max_device_tokens")
    if cap is not None and longest > cap:
        raise PhituneError(f"train.max_device_tokens={cap}: the longest example has {longest} tokens "
                           f"(examples are truncated to {max_len}): raise train.max_device_tokens to at least "
                           f"{longest}, or set data.max_seq_len={cap} to truncate examples to it")


def enable_gradient_checkpointing(model) -> None:
    """Hugging Face's per-layer checkpointing, non-reentrant: it needs no input that requires
    grad (a frozen embedding under LoRA), keeps the packed rows' kwargs, and restores the RNG
    state, so LoRA dropout draws the same masks in the recomputation."""
    if not getattr(model, "supports_gradient_checkpointing", True):
        raise PhituneError(f"train.gradient_checkpointing=true: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_out_of_memory(exc: BaseException | None) -> bool:
    """torch's OutOfMemoryError (CUDA's is the same class), also after a pickling round trip,
    or the host allocator's failure."""
    if exc is None:
        return False
    msg = str(exc)
    return (type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in msg
            or f"{CPU_ALLOCATOR}: can't allocate memory" in msg)


def out_of_memory_line(exc: BaseException) -> str:
    """One line for an out-of-memory failure: which memory, the settings that reduce it, and
    the allocator's first sentence (its full text is a paragraph of allocator statistics)."""
    msg = " ".join(str(exc).split())
    if CPU_ALLOCATOR in msg:  # "[enforce fail at alloc_cpu.cpp:N] err == 0. DefaultCPUAllocator: ..."
        return f"out of host memory: {OOM_HINT} ({msg[msg.index(CPU_ALLOCATOR):].split('. ')[0][:160]})"
    return f"out of GPU memory: {OOM_HINT} ({type(exc).__name__}: {msg.split('. ')[0][:160]})"


def failure_line(exc: BaseException) -> str:
    """What a failed run or trial records: `Type: message`, or the out-of-memory line."""
    return out_of_memory_line(exc) if is_out_of_memory(exc) else f"{type(exc).__name__}: {exc}"
