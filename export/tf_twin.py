"""The TensorFlow twin of a ModelSpec: the torch reference's maths, in ops LiteRT runs without Flex.

Inputs stay channel-first like torch; inside, activations are NHWC (1-D signals are NHWC with H = 1)
and go back to channel-first before `flatten`, so dense weights keep torch's flatten order. Parameters
are passed in torch layouts and transposed in the graph, so weights are copied by name, never reshaped
on the host.

Why the custom gradients: TF's own conv filter gradient (`Conv2DBackpropFilter`), depthwise gradients,
`ReluGrad`/`Relu6Grad` and `AvgPoolGrad` have no TFLite builtin and would force the Flex delegate, which
the device does not have. Here the filter gradient is an im2col matmul built from per-tap strided slices,
the conv input gradient is `conv2d_transpose` (builtin TRANSPOSE_CONV), the depthwise input gradient a
stride-1 depthwise conv of the zero-dilated output gradient with the flipped kernel (any stride), relu
and relu6 are `maximum`/`minimum`, pooling is a reshape + mean, global pooling a mean. Padding is explicit
(symmetric `kernel // 2` for "same", none for "valid", any for `pad` layers) followed by VALID.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import tensorflow as tf

from edgepatch.protocol import graph
from edgepatch.protocol.graph import MODEL_INPUT
from edgepatch.protocol.model_spec import LayerSpec, ModelSpec, PatchSpec
from edgepatch.protocol.patch_kinds import HEAD_BIAS_PART, PatchBuilders

NORM_EPS = 1e-5  # same as export/torch_model.py

Tensors = Mapping[str, tf.Tensor]


def _tap_slices(x: tf.Tensor, kh: int, kw: int, ho: int, wo: int, stride: int) -> list[tf.Tensor]:
    """x[:, i::stride, j::stride, :] cut to the output grid, for every kernel tap (i, j), row-major."""
    taps = []
    for i in range(kh):
        for j in range(kw):
            taps.append(x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :])
    return taps


def _same(kh: int, kw: int, stride: int, pads: tuple[int, int, int, int]) -> bool:
    """Whether VALID on `pads`-padded input equals TF's "SAME" (stride 1, odd kernel, symmetric k // 2): then
    the runtime pads inside the conv (no PAD pass) and the input gradient has the unpadded shape directly."""
    return stride == 1 and kh % 2 == 1 and kw % 2 == 1 and pads == (kh // 2, kh // 2, kw // 2, kw // 2)


def _padded(x: tf.Tensor, pads: tuple[int, int, int, int]) -> tf.Tensor:
    top, bottom, left, right = pads
    return tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]]) if any(pads) else x


def conv2d_valid(x: tf.Tensor, w: tf.Tensor, stride: int, pads: tuple[int, int, int, int] = (0, 0, 0, 0)
                 ) -> tf.Tensor:
    """VALID conv of NHWC `x` zero-padded by `pads` (top, bottom, left, right) with an HWIO `w`, with a
    builtins-only gradient; the input gradient is of the unpadded `x`."""

    @tf.custom_gradient
    def conv(x: tf.Tensor, w: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        kh, kw, cin, cout = w.shape
        same = _same(kh, kw, stride, pads)
        xp = x if same else _padded(x, pads)
        y = tf.nn.conv2d(xp, w, strides=[1, stride, stride, 1], padding="SAME" if same else "VALID")

        def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            n, ho, wo = dy.shape[0], dy.shape[1], dy.shape[2]
            if (kh, kw, stride) == (1, 1, 1) and not any(pads):  # a 1x1 conv with the transposed kernel:
                dx = tf.nn.conv2d(dy, tf.transpose(w, [0, 1, 3, 2]), strides=[1, 1, 1, 1], padding="VALID")
            elif same:  # ... XNNPACK's GEMM, faster than its deconvolution. Else a transposed conv (fixed batch)
                dx = tf.nn.conv2d_transpose(dy, w, output_shape=x.shape, strides=[1, 1, 1, 1], padding="SAME")
            else:  # the gradient of the padded input, its border cut away
                dxp = tf.nn.conv2d_transpose(dy, w, output_shape=xp.shape, strides=[1, stride, stride, 1],
                                             padding="VALID")
                dx = dxp[:, pads[0]:pads[0] + x.shape[1], pads[2]:pads[2] + x.shape[2], :] if any(pads) else dxp
            # filter gradient: im2col of the taps, one matmul (Conv2DBackpropFilter would need Flex)
            taps = _tap_slices(_padded(x, pads), kh, kw, ho, wo, stride)
            cols = tf.reshape(tf.concat(taps, axis=-1), [n * ho * wo, kh * kw * cin])  # (N·Ho·Wo, kh·kw·cin)
            dw = tf.matmul(cols, tf.reshape(dy, [n * ho * wo, cout]), transpose_a=True)
            return dx, tf.reshape(dw, [kh, kw, cin, cout])

        return y, grad

    return conv(x, w)


def _dilate(dy: tf.Tensor, stride: int) -> tf.Tensor:
    """Insert stride - 1 zero rows and columns after every element of NHWC `dy` (4-D pads and reshapes)."""
    if stride == 1:
        return dy
    n, ho, wo, c = dy.shape
    rows = tf.pad(tf.reshape(dy, [n, ho, 1, wo * c]), [[0, 0], [0, 0], [0, stride - 1], [0, 0]])
    rows = tf.reshape(rows, [n * ho * stride, wo, 1, c])
    cols = tf.pad(rows, [[0, 0], [0, 0], [0, stride - 1], [0, 0]])
    return tf.reshape(cols, [n, ho * stride, wo * stride, c])


def depthwise_valid(x: tf.Tensor, w: tf.Tensor, stride: int = 1, pads: tuple[int, int, int, int] = (0, 0, 0, 0)
                    ) -> tf.Tensor:
    """VALID depthwise conv of NHWC `x` zero-padded by `pads` (top, bottom, left, right) with `w` (kh, kw, C, 1),
    any stride, builtins-only gradient. The padding is inside the custom gradient so that the input gradient
    is computed for the unpadded `x` only (not for the padded border, then cut away)."""
    top, bottom, left, right = pads

    @tf.custom_gradient
    def dwconv(x: tf.Tensor, w: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        kh, kw, c, _ = w.shape
        same = _same(kh, kw, stride, pads)
        y = tf.nn.depthwise_conv2d(x if same else _padded(x, pads), w, strides=[1, stride, stride, 1],
                                   padding="SAME" if same else "VALID")

        def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            xp = _padded(x, pads)
            _, hh, ww, _ = xp.shape
            ho, wo = dy.shape[1], dy.shape[2]
            # input gradient: full correlation of the zero-dilated dy with the flipped kernel (a plain stride-1
            # depthwise conv), its window cut to the rows/cols of the unpadded x: pad dy by what the kernel
            # reaches beyond them, crop where it reaches less; rows of x no output reads get zero.
            # The flipped kernel, not flipped activations (two REVERSE_V2 copies per layer, outside XNNPACK):
            # a weights-baked program stores it as a constant of its own, which the weight layout records as
            # a reversed-axes spot (protocol/weight_layout.py), so rewriting weights in place covers it.
            flipped = tf.reverse(w, axis=[0, 1])
            if same:  # the window is "SAME" again: the runtime pads inside the conv
                dx = tf.nn.depthwise_conv2d(dy, flipped, strides=[1, 1, 1, 1], padding="SAME")
            else:
                dyd = _dilate(dy, stride)
                extra_h, extra_w = hh - ho * stride, ww - wo * stride
                if extra_h < 0 or extra_w < 0:
                    dyd = dyd[:, :ho * stride + min(extra_h, 0), :wo * stride + min(extra_w, 0), :]
                dy_full = _pad_or_crop(dyd, (kh - 1 - top, max(extra_h, 0) - bottom,
                                             kw - 1 - left, max(extra_w, 0) - right))
                dx = tf.nn.depthwise_conv2d(dy_full, flipped, strides=[1, 1, 1, 1], padding="VALID")
            taps = [tf.reduce_sum(t * dy, axis=[0, 1, 2]) for t in _tap_slices(xp, kh, kw, ho, wo, stride)]
            return dx, tf.reshape(tf.stack(taps, axis=0), [kh, kw, c, 1])

        return y, grad

    return dwconv(x, w)


def _pad_or_crop(h: tf.Tensor, amounts: tuple[int, int, int, int]) -> tf.Tensor:
    """NHWC `h` zero-padded by the positive (top, bottom, left, right) amounts and cropped by the negative ones."""
    t, b, lft, r = amounts
    if min(amounts) < 0:
        _, hh, ww, _ = h.shape
        h = h[:, max(-t, 0):hh - max(-b, 0), max(-lft, 0):ww - max(-r, 0), :]
    if max(amounts) > 0:
        h = tf.pad(h, [[0, 0], [max(t, 0), max(b, 0)], [max(lft, 0), max(r, 0)], [0, 0]])
    return h


def _pad_spatial(h: tf.Tensor, pads: tuple[int, ...], dims: int) -> tf.Tensor:
    """Zero padding with (before, after) per spatial dim in spec order; 1-D signals pad the W axis."""
    if not any(pads):
        return h
    rows = [pads[0], pads[1]] if dims == 2 else [0, 0]
    cols = [pads[2], pads[3]] if dims == 2 else [pads[0], pads[1]]
    return tf.pad(h, [[0, 0], rows, cols, [0, 0]])


def _spatial_pads(layer: LayerSpec, dims: int) -> tuple[int, int, int, int]:
    """A conv's symmetric padding as NHWC (top, bottom, left, right); a 1-D signal pads only W (H = 1)."""
    pads = graph.conv_padding(layer, dims)
    ph, pw = pads if dims == 2 else (0, pads[0])
    return (ph, ph, pw, pw)


def _avgpool(h: tf.Tensor, layer: LayerSpec, dims: int) -> tf.Tensor:
    """Floor-mode average pooling as crop + reshape + mean (AvgPoolGrad would need Flex); rank <= 4."""
    _, hh, ww, c = h.shape
    kh, kw = graph.kernel_size(layer, 2) if dims == 2 else (1, layer.kernel)
    ho, wo = hh // kh, ww // kw
    if (ho, wo) == (1, 1):  # one window (the MLPerf Tiny heads): one MEAN, one broadcast MUL back
        return _window_mean(h, kh, kw)
    if (ho * kh, wo * kw) != (hh, ww):  # floor mode drops the ragged edge; Slice's gradient is a builtin Pad
        h = tf.slice(h, [0, 0, 0, 0], [-1, ho * kh, wo * kw, c])
    return _pool_mean(h, kh, kw)


def _window_mean(h: tf.Tensor, kh: int, kw: int) -> tf.Tensor:
    """Mean of NHWC `h` over its top-left kh x kw window (floor-mode pooling to a single output cell). The
    gradient is dy times a constant map (1 / (kh·kw) in the window, 0 on the dropped edge): one broadcast MUL,
    where the general pooling gradient spreads rows and columns apart and pads the dropped edge back."""

    @tf.custom_gradient
    def pool(h: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        _, hh, ww, c = h.shape
        window = h if (hh, ww) == (kh, kw) else tf.slice(h, [0, 0, 0, 0], [-1, kh, kw, c])
        out = tf.reduce_mean(window, axis=[1, 2], keepdims=True)

        def grad(dy: tf.Tensor) -> tf.Tensor:
            spread = tf.pad(tf.fill([1, kh, kw, 1], 1.0 / (kh * kw)), [[0, 0], [0, hh - kh], [0, ww - kw], [0, 0]])
            return dy * spread

        return out, grad

    return pool(h)


def _pool_mean(h: tf.Tensor, kh: int, kw: int) -> tf.Tensor:
    """Mean over kh x kw blocks of an NHWC `h` whose H, W are multiples; gradient = dy spread by broadcast
    MULs (the autodiff gradient of the mean is a TILE, which XNNPACK does not run)."""

    @tf.custom_gradient
    def pool(h: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        n, hh, ww, c = h.shape
        ho, wo = hh // kh, ww // kw
        out = h
        if kh > 1:
            out = tf.reduce_mean(tf.reshape(out, [-1, ho, kh, wo * kw * c]), axis=2)  # pool rows
        if kw > 1:
            out = tf.reduce_mean(tf.reshape(out, [-1, wo, kw, c]), axis=2)  # pool columns
        out = tf.reshape(out, [-1, ho, wo, c])

        def grad(dy: tf.Tensor) -> tf.Tensor:
            spread = tf.reshape(dy, [-1, wo, 1, c]) * tf.fill([1, 1, kw, 1], 1.0 / (kh * kw))  # columns
            spread = tf.reshape(spread, [-1, ho, 1, wo * kw * c]) * tf.ones([1, 1, kh, 1])  # rows
            return tf.reshape(spread, [-1, hh, ww, c])

        return out, grad

    return pool(h)


def _relu(h: tf.Tensor) -> tf.Tensor:
    """max(h, 0) with gradient dy * sign(out) (autodiff's GREATER_EQUAL + SELECT_V2 run outside XNNPACK)."""

    @tf.custom_gradient
    def relu(h: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        out = tf.maximum(h, 0.0)
        return out, lambda dy: dy * tf.sign(out)

    return relu(h)


def _norm(h: tf.Tensor, weight: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """Per-sample normalization over (spatial, C), per-channel affine (torch_model's `norm`)."""
    axes = [1, 2, 3]

    @tf.custom_gradient
    def normalize(h: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        centered = h - tf.reduce_mean(h, axis=axes, keepdims=True)
        inv_std = tf.math.rsqrt(tf.reduce_mean(centered * centered, axis=axes, keepdims=True) + NORM_EPS)
        xhat = centered * inv_std

        def grad(dy: tf.Tensor) -> tf.Tensor:  # closed form: a handful of ops instead of autodiff's dozens
            mean_dy = tf.reduce_mean(dy, axis=axes, keepdims=True)
            return inv_std * (dy - mean_dy - xhat * tf.reduce_mean(dy * xhat, axis=axes, keepdims=True))

        return xhat, grad

    return normalize(h) * weight + bias


def _theta(params: Tensors, layer: str, part: str, phi: tf.Tensor) -> tf.Tensor:
    """θ = θ̄ + Θ·φ for one patch part; Θ has shape (*part_shape, k)."""
    bar = params[f"{layer}.patch.{part}"]
    basis = params[f"{layer}.patch.{part}_basis"]
    k = basis.shape[-1]
    flat = tf.matmul(tf.reshape(basis, [-1, k]), tf.reshape(phi, [k, 1]))
    return bar + tf.reshape(flat, bar.shape)


APPLY_PATCH: PatchBuilders[Callable[..., tf.Tensor]] = PatchBuilders("TensorFlow")


@APPLY_PATCH.register("film")
def _film(h: tf.Tensor, params: Tensors, layer: str, phi: tf.Tensor) -> tf.Tensor:
    """h·(1 + scale) + shift per channel, closed-form gradient: the converter puts autodiff's (1, 1, 1, C) sums
    after the whole backward pass (all activations re-read cold); these are taken where the gradient is made."""

    @tf.custom_gradient
    def film(h: tf.Tensor, scale: tf.Tensor, shift: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            axes = list(range(len(dy.shape) - 1))
            return dy * (1.0 + scale), tf.reduce_sum(dy * h, axis=axes), tf.reduce_sum(dy, axis=axes)

        return h * (1.0 + scale) + shift, grad

    return film(h, _theta(params, layer, "scale", phi), _theta(params, layer, "shift", phi))


@APPLY_PATCH.register("lowrank")
def _lowrank(h: tf.Tensor, params: Tensors, layer: str, phi: tf.Tensor) -> tf.Tensor:
    down = _theta(params, layer, "down", phi)  # (r, C)
    up = _theta(params, layer, "up", phi)  # (C, r)
    c = h.shape[-1]
    flat = tf.reshape(h, [-1, c])
    z = tf.maximum(tf.matmul(flat, down, transpose_b=True), 0.0)
    return h + tf.reshape(tf.matmul(z, up, transpose_b=True), tf.shape(h))


def _apply_patch(h: tf.Tensor, patch: PatchSpec, params: Tensors, layer: str, phi: tf.Tensor) -> tf.Tensor:
    """Patch on channels-last activations (NHWC, or (N, F) after a dense layer), by the registered builder."""
    return APPLY_PATCH.get(patch.kind)(h, params, layer, phi)


def _layer(layer: LayerSpec, h: tf.Tensor, params: Tensors, dims: int, other: tf.Tensor | None = None,
           pads: tuple[int, int, int, int] = (0, 0, 0, 0)) -> tf.Tensor:
    """One layer on channels-last `h`; a conv also zero-pads `h` by `pads` (a `pad` layer folded into it)."""
    n = layer.name
    if layer.kind in ("conv2d", "conv1d", "dwconv2d"):
        pads = tuple(a + b for a, b in zip(_spatial_pads(layer, dims), pads, strict=True))  # type: ignore[assignment]
    if layer.kind in ("conv2d", "conv1d"):
        w = params[f"{n}.weight"]  # torch (O, I, kh, kw) or (O, I, k)
        w = tf.transpose(w, [2, 3, 1, 0]) if dims == 2 else tf.expand_dims(tf.transpose(w, [2, 1, 0]), 0)
        return conv2d_valid(h, w, layer.stride, pads) + params[f"{n}.bias"]
    if layer.kind == "dwconv2d":
        w = tf.transpose(params[f"{n}.weight"], [2, 3, 0, 1])  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return depthwise_valid(h, w, layer.stride, pads) + params[f"{n}.bias"]
    if layer.kind == "dense":
        return tf.matmul(h, params[f"{n}.weight"], transpose_b=True) + params[f"{n}.bias"]
    if layer.kind == "relu":
        return _relu(h)
    if layer.kind == "relu6":  # min/max, not tf.nn.relu6 (its Relu6Grad has no builtin)
        return tf.minimum(tf.maximum(h, 0.0), 6.0)
    if layer.kind == "avgpool":
        return _avgpool(h, layer, dims)
    if layer.kind == "gap":
        return tf.reduce_mean(h, axis=[1, 2])  # NHWC (1-D: H = 1) -> (N, C)
    if layer.kind == "pad":
        return _pad_spatial(h, layer.pads, dims)
    if layer.kind == "add":
        return h + other
    if layer.kind == "flatten":
        if len(h.shape) == 2:  # after gap: already (N, C)
            return h
        _, hh, ww, c = h.shape
        chw = tf.transpose(h, [0, 3, 1, 2])  # torch flattens channel-major
        return tf.reshape(chw, [-1, c * hh * ww] if dims == 2 else [-1, c * ww])
    if layer.kind == "norm":
        return _norm(h, params[f"{n}.weight"], params[f"{n}.bias"])
    raise ValueError(f"unknown layer kind {layer.kind!r}")


def to_channels_last(x: tf.Tensor, dims: int) -> tf.Tensor:
    """(N, C, H, W) -> (N, H, W, C); (N, C, L) -> (N, 1, L, C)."""
    if dims == 2:
        return tf.transpose(x, [0, 2, 3, 1])
    return tf.expand_dims(tf.transpose(x, [0, 2, 1]), 1)


def forward(spec: ModelSpec, patch: PatchSpec | None, params: Tensors, x: tf.Tensor,
            phi: tf.Tensor | None = None) -> tf.Tensor:
    """Logits of the (patched) model; the same contract as export/torch_model.py::forward."""
    acts: dict[str, tf.Tensor] = {MODEL_INPUT: to_channels_last(x, spec.dims)}
    folded = _foldable_pads(spec, patch)
    for layer in spec.layers:
        names = spec.operands(layer.name)
        if layer.name in folded:  # the conv reading it pads (and takes the gradient of the unpadded input)
            acts[layer.name] = acts[names[0]]
            continue
        ins = [acts[name] for name in names]
        pads = folded.get(names[0], (0, 0, 0, 0))
        h = _layer(layer, ins[0], params, spec.dims, ins[1] if len(ins) > 1 else None, pads)
        if patch is not None and phi is not None and layer.name in patch.layers:
            h = _apply_patch(h, patch, params, layer.name, phi)
        acts[layer.name] = h
    logits = acts[spec.layers[-1].name]
    if patch is not None and phi is not None and patch.head_bias:  # torch_model.add_head_bias
        logits = logits + _theta(params, spec.layers[-1].name, HEAD_BIAS_PART, phi)
    return logits


def _foldable_pads(spec: ModelSpec, patch: PatchSpec | None) -> dict[str, tuple[int, int, int, int]]:
    """`pad` layers read only by one convolution, as NHWC (top, bottom, left, right): that conv pads inside
    its custom gradient, whose input gradient is then of the unpadded tensor (no gradient computed for the
    border and cut away by the pad's own gradient, a SLICE, at every stride-2 block of the MLPerf models)."""
    readers: dict[str, list[LayerSpec]] = {}
    for layer in spec.layers:
        for name in spec.operands(layer.name):
            readers.setdefault(name, []).append(layer)
    out = {}
    for layer in spec.layers:
        users = readers.get(layer.name, [])
        if (layer.kind == "pad" and len(users) == 1 and spec.operands(users[0].name)[0] == layer.name
                and users[0].kind in ("conv2d", "conv1d", "dwconv2d")
                and (patch is None or layer.name not in patch.layers)):
            p = layer.pads
            out[layer.name] = (p[0], p[1], p[2], p[3]) if spec.dims == 2 else (0, 0, p[0], p[1])
    return out


def cross_entropy(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy from explicit ops (the fused TF kernel has no builtin twin)."""
    shifted = logits - tf.stop_gradient(tf.reduce_max(logits, axis=-1, keepdims=True))
    log_probs = shifted - tf.math.log(tf.reduce_sum(tf.exp(shifted), axis=-1, keepdims=True))
    onehot = tf.one_hot(y, logits.shape[-1], dtype=logits.dtype)
    return -tf.reduce_mean(tf.reduce_sum(onehot * log_probs, axis=-1))


def adam(param: tf.Tensor, grad: tf.Tensor, m: tf.Tensor, v: tf.Tensor, step: tf.Tensor, lr: tf.Tensor,
         beta1: float, beta2: float, eps: float) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """protocol/optim.py::adam_step in graph ops; `step` = steps already taken (t = step + 1)."""
    t = step + 1.0
    m = beta1 * m + (1.0 - beta1) * grad
    v = beta2 * v + (1.0 - beta2) * grad * grad
    m_hat = m / (1.0 - tf.pow(tf.constant(beta1, tf.float32), t))
    v_hat = v / (1.0 - tf.pow(tf.constant(beta2, tf.float32), t))
    return param - lr * m_hat / (tf.sqrt(v_hat) + eps), m, v
