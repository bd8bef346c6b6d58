"""Pure reconciliation rules: keys, padding, fused weights, optimizer mapping, tensor ops."""
