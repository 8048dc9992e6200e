"""KV codec: quantizers and the KVWire v1 wire format (no model needed)."""

from ember.kv.quant import QuantSpec, dequantize, fake_quant, quantize
from ember.kv.wire import KVPayload, WireConfig, expected_size, inspect, pack, unpack

__all__ = ["QuantSpec", "dequantize", "fake_quant", "quantize", "KVPayload", "WireConfig", "expected_size",
           "inspect", "pack", "unpack"]
