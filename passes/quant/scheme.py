"""`quant`'s scheme options from the target profile: what `--target` changes.

A target profile's `[quant]` table (edgegraph/targets/*.toml, `targets.QuantScheme`) says how the
runtime wants a model quantized. The scheme options of `quant` (`activation_type`, `weight_type`,
`per_channel`, `symmetric_activations`) default to "target": each takes the profile's value, so
`--target tflite` gives int8 symmetric per-channel weights with int8 activations (the TFLite
quantization spec) and the default `cpu` target the uint8 activations / int8 weights of ORT's
MLAS kernels. An option given explicitly wins over the profile.

A target that runs no Q/DQ at all (`qdq = false`, CoreML: its scheme is weight-only) is refused
in one line: the QDQ model quant writes would split into one partition per Q/DQ node there.
"""

from __future__ import annotations

import dataclasses

from edgegraph.errors import PassOptionError

TARGET = "target"  # the default of the scheme options: "as the target's profile says"
# profile dtype (targets.QUANT_DTYPES) -> quant's activation_type / weight_type
_ACTIVATIONS = {"u8": "uint8", "s8": "int8", "u16": "int16", "s16": "int16"}
_WEIGHTS = {"s8": "int8", "u8": "uint8"}


def resolve(options, target):
    """(`options` with every scheme option left at "target" set from `target`'s scheme, notes
    saying what came from the profile). `target` is the pass context's profile."""
    scheme, name = target.quant, getattr(target, "name", "the target")
    if not scheme.qdq or scheme.weight_only:
        # Even weight-only Q/DQ (DequantizeLinear on constant weights, float activations) does not
        # help there: onnxruntime's constant folding keeps DequantizeLinear for QDQ models, and the
        # CoreML EP has no DequantizeLinear builder, so every DQ is a CPU fallback (the profile's
        # [quant] note gives the sources). What reaches the EP as float weights is an encoding the
        # folding does evaluate: codebook's Gather of a constant table (CIFAR CNN: 1 partition).
        raise PassOptionError(
            f"quant: {name} runs no QuantizeLinear/DequantizeLinear, not even on constant weights (its scheme "
            f"is weight-only: {scheme.note or 'see its profile'}); a QDQ model would split into CPU fallbacks there. "
            "Compress its weights with codebook instead (onnxruntime folds its decode into float weights "
            "before the EP: a smaller file, one partition), or quantize for another --target")
    wanted = {
        "activation_type": _ACTIVATIONS.get(scheme.activations),
        "weight_type": _WEIGHTS.get(scheme.weights),
        "per_channel": scheme.per_channel,
        "symmetric_activations": scheme.symmetric_activations,
    }
    chosen = {key: value for key, value in wanted.items() if getattr(options, key) == TARGET}
    for key, value in chosen.items():
        if value is None:
            raise PassOptionError(f"quant: {name}'s profile has no {key} quant can make "
                                  f"({scheme.activations if key == 'activation_type' else scheme.weights}); "
                                  f"give {key}= explicitly")
    notes = [f"scheme of the {name} profile: " + ", ".join(f"{k}={v}" for k, v in chosen.items())] if chosen else []
    wide = options.activation_type == "int16" or options.sensitive_type == "int16"
    if wide and not scheme.a16w8:
        notes.append(f"{name} runs no 16-bit activations (a16w8): the int16 layers will fall back to its CPU")
    return dataclasses.replace(options, **chosen), notes
