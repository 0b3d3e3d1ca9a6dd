"""Dense attention with a local prefix: the first `prefix` query rows see only a key window.

    rows j <  prefix: keys [0, n_global) + the window of j's chunk + [prefix, S)
    rows j >= prefix: every key

(With pad keys, a row's n_global global keys are its first valid ones: with left pads, where its
prompt begins.)

The prefix is cut into chunks of C = window // 2 query rows; chunk c's window is the `window`
keys starting at clip(c*C - C//2, n_global, prefix - window), so each row sees about C/2 keys
on either side (more on one side at the edges) and the window never overlaps the global keys: no
key is counted twice. Each chunk is one row of a batched dense attention call (cuDNN on GPU,
splash on TPU, XLA elsewhere, as `dense_attention.attention` picks), over G + W + (S - prefix)
keys instead of S: at a 32K prompt with W = 2048 that is 7% of the dense attention's FLOPs.

Why: a diffusion LLM's cache refresh is compute-bound attention over the whole canvas; its
prompt rows are ~99% of that work. This is the "sparse attention for the prompt's queries" of
the refresh economy (focus_jax.decoding.cache.RefreshPolicy.prompt_window): an approximation,
whose accuracy cost benchmarks/accuracy.py measures. Kernels know nothing of models: the prefix
is any leading run of query rows.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from focus_jax.kernels import dense_attention


def chunk_windows(prefix: int, window: int, n_global: int) -> np.ndarray:
  """Start of each chunk's key window (static): [ceil(prefix / C)] int, C = window // 2."""
  chunk = window // 2
  n_chunks = -(-prefix // chunk)
  starts = np.arange(n_chunks) * chunk - chunk // 2
  return np.clip(starts, n_global, prefix - window)


def check_local(prefix: int, seq_len: int, window: int, n_global: int) -> str | None:
  """None when the local prefix applies to these lengths, else why the call stays dense."""
  if window < 2 or window % 2:
    return f"window {window} must be an even number >= 2"
  if n_global < 0:
    return f"n_global {n_global} must be >= 0"
  if not 0 < prefix <= seq_len:
    return f"prefix {prefix} must lie in (0, {seq_len}]"
  if prefix < n_global + window + window // 2:
    return (f"prefix {prefix} is shorter than n_global + 1.5 x window = "
            f"{n_global + window + window // 2}: a local window would save nothing")
  return None


def key_mask(seq_len: int, prefix: int, window: int, n_global: int,
             key_valid: np.ndarray | None = None) -> np.ndarray:
  """[S, S] bool: the keys each query row sees (the definition; for tests and diagnostics).
  With `key_valid` [B, S], [B, S, S]: a row's global keys are its first n_global valid ones."""
  if key_valid is not None:
    masks = []
    for valid in np.asarray(key_valid, bool):
      mask = key_mask(seq_len, prefix, window, n_global)
      mask[:prefix] |= global_keys(valid, prefix, n_global)  # (the leading valid keys are in it)
      masks.append(mask & valid)
    return np.stack(masks)
  chunk = window // 2
  starts = chunk_windows(prefix, window, n_global)
  mask = np.zeros((seq_len, seq_len), bool)
  mask[prefix:] = True
  for j in range(prefix):
    w = starts[j // chunk]
    mask[j, :n_global] = True
    mask[j, w:w + window] = True
    mask[j, prefix:] = True
  return mask


def global_keys(valid, prefix: int, n_global: int):
  """[S] bool (NumPy or JAX, one row or a batch [..., S]): a row's first n_global valid keys of
  the prefix, its attention sinks (with left pads, where its prompt begins; the selected
  prompt blocks force the blocks holding them)."""
  xp = jnp if isinstance(valid, jax.Array) else np
  in_prefix = xp.arange(valid.shape[-1]) < prefix
  return valid & in_prefix & (xp.cumsum(valid & in_prefix, axis=-1) <= n_global)


def local_prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, prefix: int,
                           window: int, n_global: int, key_valid: jax.Array | None = None,
                           query_valid: jax.Array | None = None,
                           implementation: str = "auto") -> jax.Array:
  """q [B, S, Hq, D] (row j is position j), k/v [B, S, Hkv, D] -> [B, S, Hq, D].

  `key_valid` / `query_valid` [B, S] as for `dense_attention.attention`. When the lengths do not
  suit a local window (`check_local`), this is plain dense attention.
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  b, s, hq, d = q.shape
  chex.assert_shape(k, (b, s, None, d))
  attend = lambda qq, kk, vv, kv_ok, q_ok: dense_attention.attention(
      qq, kk, vv, key_valid=kv_ok, query_valid=q_ok, implementation=implementation)
  if check_local(prefix, s, window, n_global) is not None:
    return attend(q, k, v, key_valid, query_valid)
  chunk = window // 2
  starts = chunk_windows(prefix, window, n_global)
  n_chunks = len(starts)
  # Key positions of each chunk: globals, its window, the tail (static [n_chunks, K] table).
  keys = np.concatenate([np.broadcast_to(np.arange(n_global), (n_chunks, n_global)),
                         starts[:, None] + np.arange(window),
                         np.broadcast_to(np.arange(prefix, s), (n_chunks, s - prefix))], axis=1)
  n_keys = keys.shape[1]
  keys = jnp.asarray(keys.reshape(-1), jnp.int32)

  def per_chunk_keys(x):  # [B, S, ...] -> [B * n_chunks, K, ...]
    return jnp.take(x, keys, axis=1).reshape((b * n_chunks, n_keys) + x.shape[2:])

  def per_chunk_rows(x):  # the prefix rows [B, prefix, ...] -> [B * n_chunks, C, ...]
    pad = n_chunks * chunk - prefix
    x = x[:, :prefix]
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape((b * n_chunks, chunk) + x.shape[2:])

  # Rows padding the last chunk are zeros (finite, dropped after): they need no mask, which
  # would cost cuDNN its unmasked path.
  q_rows_ok = None if query_valid is None else per_chunk_rows(query_valid)
  if key_valid is None:
    local = attend(per_chunk_rows(q), per_chunk_keys(k), per_chunk_keys(v), None, q_rows_ok)
  else:
    # A row's globals are its first n_global valid keys (with left pads, where its prompt
    # begins), gathered per row in place of the leading positions; a window key among them is
    # masked so that no key counts twice.
    is_global = global_keys(key_valid, prefix, n_global)
    first_valid, _ = dense_attention.valid_first(
        jnp.arange(prefix, dtype=jnp.int32), is_global[:, :prefix])
    table = jnp.broadcast_to(keys.reshape(n_chunks, n_keys), (b, n_chunks, n_keys))
    table = table.at[:, :, :n_global].set(first_valid[:, None, :n_global])
    ok = jnp.take_along_axis(key_valid, table.reshape(b, -1), axis=1).reshape(table.shape)
    ok = ok & ((jnp.arange(n_keys) < n_global) | ~jnp.take_along_axis(
        is_global, table.reshape(b, -1), axis=1).reshape(table.shape))
    gather = lambda x: jnp.take_along_axis(
        x, table.reshape(b, -1)[:, :, None, None], axis=1).reshape(
            (b * n_chunks, n_keys) + x.shape[2:])
    local = attend(per_chunk_rows(q), gather(k), gather(v), ok.reshape(b * n_chunks, n_keys),
                   q_rows_ok)
  return with_dense_tail(local.reshape(b, n_chunks * chunk, hq, d)[:, :prefix], q, k, v,
                         key_valid, query_valid, implementation)


def with_dense_tail(prefix_out: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
                    key_valid: jax.Array | None, query_valid: jax.Array | None,
                    implementation: str) -> jax.Array:
  """The prefix rows' output [B, P, Hq, D] followed by the rows after it, which attend to every
  key (densely; none when the prefix is the whole sequence): [B, S, Hq, D]."""
  prefix = prefix_out.shape[1]
  if prefix == q.shape[1]:
    return prefix_out
  tail_ok = None if query_valid is None else query_valid[:, prefix:]
  tail = dense_attention.attention(q[:, prefix:], k, v, key_valid=key_valid,
                                   query_valid=tail_ok, implementation=implementation)
  return jnp.concatenate([prefix_out, tail], axis=1)
