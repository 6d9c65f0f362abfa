"""Networks: the legacy VNet family (and, per dataset, 2D networks)."""

from .factory import default_network
from .vnet import MultiDecoderVNet, VNet, VNetDecoder, VNetEncoder, count_parameters, evaluated_parameters

__all__ = ["MultiDecoderVNet", "VNet", "VNetDecoder", "VNetEncoder", "count_parameters", "default_network",
           "evaluated_parameters"]
