"""Synthetic latent videos of moving, scaling, coloured Gaussian blobs, with a "text" embedding.

Everything is generated on the fly with ``jax.random`` at latent resolution, so training needs no
files. Each sample has 1..max_blobs blobs; blob b has a start centre (y, x) in [0.2, 0.8], a
velocity over the clip, a start radius, a growth factor (radius at the last frame / first) and a
colour in [-1, 1]^C. The text is one "global" token (number of blobs) then one token per blob, a
fixed deterministic projection (seeded by ``text_seed``) of the blob parameters; the remaining
text slots are zero padding (``text_mask`` False). Valid text slots always come first.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlobDataConfig:
  """latent_shape: (T, H, W, C); text_max_len >= 1 + max_blobs; text_dim: embedding width."""

  latent_shape: tuple[int, int, int, int]
  text_max_len: int
  text_dim: int
  max_blobs: int = 3
  min_blobs: int = 1
  text_seed: int = 1234

  def __post_init__(self):
    if len(self.latent_shape) != 4 or any(s <= 0 for s in self.latent_shape):
      raise ValueError(f"latent_shape must be 4 positive ints (T, H, W, C), got {self.latent_shape}")
    if not 1 <= self.min_blobs <= self.max_blobs:
      raise ValueError(f"need 1 <= min_blobs ({self.min_blobs}) <= max_blobs ({self.max_blobs})")
    if self.text_max_len < 1 + self.max_blobs:
      raise ValueError(f"text_max_len ({self.text_max_len}) must be >= 1 + max_blobs "
                       f"({1 + self.max_blobs}): one global token and one per blob")
    if self.text_dim <= 0:
      raise ValueError(f"text_dim must be positive, got {self.text_dim}")

  @classmethod
  def for_model(cls, cfg, **overrides) -> "BlobDataConfig":
    """Matches a :class:`models.video_dit.VideoDiTConfig` (latent, text slots, text width)."""
    max_blobs = min(3, cfg.text_max_len - 1)
    kw = dict(latent_shape=cfg.latent_shape, text_max_len=cfg.text_max_len,
              text_dim=cfg.text_dim, max_blobs=max_blobs, min_blobs=1) | overrides
    return cls(**kw)

  @property
  def param_dim(self) -> int:
    """Blob parameter vector: centre (2), velocity (2), radius, growth, colour (C), present."""
    return 2 + 2 + 1 + 1 + self.latent_shape[3] + 1


def _text_projection(cfg: BlobDataConfig):
  k1, k2 = jax.random.split(jax.random.key(cfg.text_seed))
  w_blob = jax.random.normal(k1, (cfg.param_dim, cfg.text_dim)) / jnp.sqrt(cfg.param_dim)
  w_global = jax.random.normal(k2, (cfg.max_blobs + 1, cfg.text_dim))
  return w_blob, w_global


def _one(key, cfg: BlobDataConfig):
  t_, h_, w_, c_ = cfg.latent_shape
  nb = cfg.max_blobs
  ks = jax.random.split(key, 7)
  n = jax.random.randint(ks[0], (), cfg.min_blobs, cfg.max_blobs + 1)
  present = jnp.arange(nb) < n  # [nb]
  centre = jax.random.uniform(ks[1], (nb, 2), minval=0.2, maxval=0.8)
  velocity = jax.random.uniform(ks[2], (nb, 2), minval=-0.3, maxval=0.3)
  radius = jax.random.uniform(ks[3], (nb,), minval=0.08, maxval=0.2)
  growth = jnp.exp(jax.random.uniform(ks[4], (nb,), minval=-0.4, maxval=0.4))
  colour = jax.random.uniform(ks[5], (nb, c_), minval=-1.0, maxval=1.0)

  tt = jnp.linspace(0.0, 1.0, t_) if t_ > 1 else jnp.zeros((1,))
  yy = (jnp.arange(h_) + 0.5) / h_
  xx = (jnp.arange(w_) + 0.5) / w_
  cy = centre[:, 0, None] + velocity[:, 0, None] * tt  # [nb, T]
  cx = centre[:, 1, None] + velocity[:, 1, None] * tt
  r = radius[:, None] * growth[:, None] ** tt  # [nb, T]
  d2 = ((yy[None, None, :, None] - cy[..., None, None]) ** 2
        + (xx[None, None, None, :] - cx[..., None, None]) ** 2)  # [nb, T, H, W]
  g = jnp.exp(-d2 / (2 * r[..., None, None] ** 2)) * present[:, None, None, None]
  video = jnp.einsum("nthw,nc->thwc", g, colour)

  params = jnp.concatenate([centre, velocity, radius[:, None], growth[:, None], colour,
                            jnp.ones((nb, 1))], -1) * present[:, None]  # [nb, param_dim]
  w_blob, w_global = _text_projection(cfg)
  blob_tokens = jnp.tanh(params @ w_blob) * present[:, None]  # [nb, text_dim]
  global_token = jnp.tanh(w_global[n])[None]  # [1, text_dim]
  text = jnp.zeros((cfg.text_max_len, cfg.text_dim))
  text = text.at[0].set(global_token[0]).at[1:1 + nb].set(blob_tokens)
  mask = jnp.arange(cfg.text_max_len) < 1 + n
  return video, text, mask


@functools.partial(jax.jit, static_argnames=("cfg", "batch"))
def make_batch(key, cfg: BlobDataConfig, batch: int) -> dict:
  """One batch.

  Returns:
    dict with "latent" [batch, T, H, W, C] float32, "text" [batch, text_max_len, text_dim]
    float32, "text_mask" [batch, text_max_len] bool (a prefix of 1 + number of blobs slots).
  """
  video, text, mask = jax.vmap(lambda k: _one(k, cfg))(jax.random.split(key, batch))
  return {"latent": video, "text": text, "text_mask": mask}
