"""NVIDIA DSX Exchange over MQTT: the gateway as DSX Flex ISV and as a DSX BMS integration, plus simulators.

Contract: ``NVIDIA/dsx-exchange`` AsyncAPI dsx-flex 1.7.0 and bms 1.0.0 (docs/dsx.md).
"""

from protocols.dsx.agent_sim import DsxFlexAgentSim, FeedLoad, RampFeed, SimFeedSpec
from protocols.dsx.bms_meter import BmsSettings, DsxBmsMeter
from protocols.dsx.bms_sim import DsxBmsSim, SimMeter
from protocols.dsx.build import bms_meter_from_config, flex_client_from_config
from protocols.dsx.codec import Codec
from protocols.dsx.errors import MessageRefused, Reason
from protocols.dsx.flex_client import DsxFlexClient, FlexSettings
from protocols.dsx.flex_state import BreachAlert, CommandTiming, Enforcement, FeedLimits, FeedReading
from protocols.dsx.jws import KeyRing, Signer
from protocols.dsx.mqtt import BrokerParams, MqttSession

__all__ = [
    "BmsSettings",
    "BreachAlert",
    "BrokerParams",
    "Codec",
    "CommandTiming",
    "DsxBmsMeter",
    "DsxBmsSim",
    "DsxFlexAgentSim",
    "DsxFlexClient",
    "Enforcement",
    "FeedLimits",
    "FeedLoad",
    "FeedReading",
    "FlexSettings",
    "KeyRing",
    "MessageRefused",
    "MqttSession",
    "RampFeed",
    "Reason",
    "Signer",
    "SimFeedSpec",
    "SimMeter",
    "bms_meter_from_config",
    "flex_client_from_config",
]
