"""Logical axis names used by every module, and the default logical -> mesh rules.

Parameters and activations use different names so that the same mesh axis can shard a weight's
embedding dimension (fsdp) and an activation's batch dimension without a conflict, the way
MaxText separates `embed` from `activation_embed`.

Parameter axes:  embed, mlp, heads, kv, vocab, layers (scan axis), conv_in, conv_out, norm
Activation axes: act_batch, act_length, act_embed, act_mlp, act_heads, act_kv, act_vocab

Mesh axes: data, fsdp, tensor. A config may override `sharding_rules` with its own table.
"""

MESH_AXES = ("data", "fsdp", "tensor")

# Mesh axes over which the batch dimension of inputs (and `act_batch`) is split.
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES = (
    # Activations: batch over data x fsdp, hidden dims over tensor.
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    # Parameters: fsdp shards the model dimension, tensor the wide/inner dimensions.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
)
