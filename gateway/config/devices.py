"""The site's equipment: [battery], [meter] (Modbus, OPC UA or the DSX bus) and [ups]."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from gateway.config.dsx import DsxMeterConfig
from gateway.config.section import Host, _Section, _url_of


class ModbusEndpointConfig(_Section):
    """Where a Modbus TCP device answers: the keys [battery], [meter] and [ups] share."""

    host: Host = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=247)  # the Modbus unit (device) id
    timeout_s: float = Field(1.0, gt=0, le=60)  # per request


class BatteryConfig(ModbusEndpointConfig):
    enabled: bool = True
    device_id: str = "bess1"
    mapping: str = "bess_generic"
    revert_s: float = Field(60.0, gt=0, le=3600)


class OpcuaClientConfig(_Section):
    url: Annotated[str, _url_of("opc.tcp")] = "opc.tcp://127.0.0.1:4840"
    node_map: str = "opcua_substation"
    security: Literal["Basic256Sha256_SignAndEncrypt", "none"] = "Basic256Sha256_SignAndEncrypt"
    certificate: str | None = None
    private_key: str | None = None
    server_certificate: str | None = None
    username: str | None = None
    password_file: str | None = None
    timeout_s: float = Field(4.0, gt=0, le=60)

    @model_validator(mode="after")
    def _secure(self) -> OpcuaClientConfig:
        if self.security != "none":
            for key in ("certificate", "private_key", "server_certificate"):
                if getattr(self, key) is None:
                    raise ValueError(f"{key} is required with security {self.security}")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


class MeterConfig(ModbusEndpointConfig):  # the endpoint keys serve backend = "modbus"
    backend: Literal["estimate", "modbus", "opcua", "dsx"] = "estimate"
    device_id: str = "meter1"
    mapping: str = "meter_facility"
    opcua: OpcuaClientConfig | None = None
    min_w: float | None = Field(None, allow_inf_nan=False)  # a reading below is impossible here: a fault
    max_w: float | None = Field(None, allow_inf_nan=False)  # a reading above is impossible here: a fault
    dsx: DsxMeterConfig | None = None

    @model_validator(mode="after")
    def _backend(self) -> MeterConfig:
        if self.backend == "opcua" and self.opcua is None:
            raise ValueError("backend opcua needs a [meter.opcua] section")
        if self.min_w is not None and self.max_w is not None and self.min_w >= self.max_w:
            raise ValueError(f"min_w {self.min_w} must be below max_w {self.max_w}")
        if self.backend == "dsx" and self.dsx is None:
            raise ValueError("backend dsx needs a [meter.dsx] section")
        return self


class UpsConfig(ModbusEndpointConfig):
    enabled: bool = False
    device_id: str = "ups1"
    mapping: str = "ups_generic"
    min_runtime_s: float = Field(600.0, ge=0)
    min_soc_pct: float = Field(50.0, ge=0, le=100)
