"""Audit record kinds: every ``kind`` the gateway appends to the audit log, in one registry.

Writers and readers (the dossier, period queries, metrics) name a kind by its constant here, not by
re-spelling the string; ``tests/unit/test_audit_kinds.py`` checks that every kind literal the code
appends is registered. ``KINDS`` maps each kind to what its row means.
"""

from __future__ import annotations

# --- The gateway and its audit log ---
GATEWAY_START = "gateway.start"
GATEWAY_STOP = "gateway.stop"
CONFIG_LOADED = "config.loaded"
CONFIG_CHANGED = "config.changed"
AUDIT_RECOVERED = "audit.recovered"
AUDIT_DB_LOST = "audit.db_lost"
AUDIT_DB_RESTORED = "audit.db_restored"
AUDIT_START_OVER = "audit.start_over"
MEASUREMENTS_BATCH = "measurements.batch"
PERFORMANCE_COMPUTED = "performance.computed"
DRILL_TICK = "drill.tick"
STANDBY_ACTIVE = "standby.active"
STANDBY_STANDBY = "standby.standby"

# --- Events from the utility ---
EVENT_RECEIVED = "event.received"
EVENT_REPEAT = "event.repeat"
EVENT_ANSWERED = "event.answered"
EVENT_REJECTED = "event.rejected"
EVENT_STALE = "event.stale"
EVENT_IGNORED = "event.ignored"
EVENT_REPORT_ONLY = "event.report_only"
EVENT_DELETED = "event.deleted"
EVENT_DISTRIBUTION_REFUSED = "event.distribution_refused"
EVENT_DECISION_FAILED = "event.decision_failed"
EVENT_START = "event.start"
EVENT_END = "event.end"
EVENT_STOPPED = "event.stopped"
EVENT_ACCOUNTING = "event.accounting"
OPT_DECIDED = "opt.decided"
OPT_HELD = "opt.held"
OPT_OVERRIDE = "opt.override"
OPT_SENT = "opt.sent"
OPT_SENT_TO_VTN = "opt.sent_to_vtn"
OPT_SEND_FAILED = "opt.send_failed"
OVERRIDE_STANDING = "override.standing"
OPT_SCHEDULE_SENT = "opt.schedule_sent"
OPT_SCHEDULE_SEND_FAILED = "opt.schedule_send_failed"
OPT_SCHEDULE_CANCEL_REJECTED = "opt.schedule_cancel_rejected"

# --- Control and equipment ---
CONTROL_TICK = "control.tick"
RECONCILE_KEPT = "reconcile.kept"
COMMAND_BATTERY = "command.battery"
COMMAND_GPUS = "command.gpus"
COMMAND_DSXFLEX = "command.dsxflex"
RELEASE_BATTERY = "release.battery"
RELEASE_GPUS = "release.gpus"
FAULT_DEVICE = "fault.device"
FAULT_READBACK = "fault.readback"
FAULT_LEASE_LAPSED = "fault.lease_lapsed"
DEVICE_RECOVERED = "device.recovered"
LINK_LOST = "link.lost"
LINK_RESTORED = "link.restored"
FALLBACK_START = "fallback.start"
FALLBACK_END = "fallback.end"
DSXFLEX_STATUS = "dsxflex.status"
DSXFLEX_BREACH = "dsxflex.breach"
DSXFLEX_ENFORCEMENT = "dsxflex.enforcement"
DSXFLEX_HOLD_LAPSED = "dsxflex.hold_lapsed"

# --- The BMS face ---
BMS_WRITE = "bms.write"
BMS_WRITE_REPEATED = "bms.write_repeated"
BMS_WRITE_REFUSED = "bms.write_refused"
BMS_INPUT_LAPSED = "bms.input_lapsed"

# --- The VEN and the wire ---
VEN_REGISTERED = "ven.registered"
VEN_REGISTRATION_REFUSED = "ven.registration_refused"
VEN_UNREGISTERED = "ven.unregistered"
VEN_CREATED = "ven.created"
VEN_LINK_LOST = "ven.link_lost"
VEN_LINK_RESTORED = "ven.link_restored"
VEN_CLOCK_SKEW = "ven.clock_skew"
VEN_CLOCK_OK = "ven.clock_ok"
VEN_MESSAGE_IGNORED = "ven.message_ignored"
XML_IN = "xml.in"
XML_OUT = "xml.out"
XML_POLL = "xml.poll"
XML_REJECTED = "xml.rejected"
REPORT_REQUESTED = "report.requested"
REPORT_SENT = "report.sent"
REPORT_SEND_FAILED = "report.send_failed"
REPORT_REFUSED = "report.refused"
REPORT_CANCELLED = "report.cancelled"
REPORT_FAILED = "report.failed"
OADR3_EXCHANGE = "oadr3.exchange"
OADR3_REJECTED = "oadr3.rejected"
OADR3_DRIFT = "oadr3.drift"
OADR3_PROGRAMS_MISSING = "oadr3.programs_missing"
OADR3_NOTIFICATION_UNREADABLE = "oadr3.notification_unreadable"
OADR3_PUSH = "oadr3.push"
OADR3_PUSH_READY = "oadr3.push_ready"
OADR3_PUSH_UNAVAILABLE = "oadr3.push_unavailable"
OADR3_PUSH_DROPPED = "oadr3.push_dropped"
OADR3_PUSH_IGNORED = "oadr3.push_ignored"
VEN_VEN_ID_REFUSED = "ven.ven_id_refused"
VEN_CANCEL_REFUSED = "ven.cancel_refused"
VEN_VTN_ID_DIFFERS = "ven.vtn_id_differs"
VEN_HOLD_ENDED = "ven.hold_ended"
VEN_REGISTRATION_CANCELLED = "ven.registration_cancelled"
REPORT_NO_DATA = "report.no_data"
REPORT_VTN_REGISTERED = "report.vtn_registered"
REPORT_VTN_REQUESTED = "report.vtn_requested"
REPORT_VTN_CANCELLED = "report.vtn_cancelled"
OPERATOR_OPENADR = "operator.openadr"
OPERATOR_CANCEL_REGISTRATION = "operator.cancel_registration"
OPERATOR_REGISTER = "operator.register"
OPERATOR_QUERY_REGISTRATION = "operator.query_registration"
OPERATOR_REQUEST_EVENTS = "operator.request_events"

# --- Security ---
AUTH_REFUSED = "auth.refused"
SECURITY_DSX_REFUSED = "security.dsx_refused"

KINDS: dict[str, str] = {
    GATEWAY_START: "the gateway started (site, events resumed)",
    GATEWAY_STOP: "the gateway stopped (why)",
    CONFIG_LOADED: "the config in force at start (all values, its SHA-256)",
    CONFIG_CHANGED: "the config changed since the last start (the keys that changed)",
    AUDIT_RECOVERED: "the audit log takes writes again after failing",
    AUDIT_DB_LOST: "the database lost rows the head marker had seen",
    AUDIT_DB_RESTORED: "the database came back from a backup",
    AUDIT_START_OVER: "the operator accepted a lost or cut log and began again",
    MEASUREMENTS_BATCH: "a batch of tick measurements sealed into the chain",
    PERFORMANCE_COMPUTED: "an event's performance against its baseline, recorded by the operator",
    DRILL_TICK: "a failover drill's tick (standby drill only)",
    STANDBY_ACTIVE: "this node took the lease and became active",
    STANDBY_STANDBY: "this node stepped down to standby",
    EVENT_RECEIVED: "an event version arrived from the VTN",
    EVENT_REPEAT: "an event version arrived again",
    EVENT_ANSWERED: "the answer sent for an event version",
    EVENT_REJECTED: "an event refused as invalid",
    EVENT_STALE: "an event version with an older modification number",
    EVENT_IGNORED: "an event not for this VEN or not acted on",
    EVENT_REPORT_ONLY: "an event whose signals only ask for reports",
    EVENT_DELETED: "an event the VTN no longer lists",
    EVENT_DISTRIBUTION_REFUSED: "a distribution refused as a whole",
    EVENT_DECISION_FAILED: "the opt decision could not be stored",
    EVENT_START: "an event came into force",
    EVENT_END: "an event ended",
    EVENT_STOPPED: "an event stopped early (cancelled, opted out, overridden)",
    EVENT_ACCOUNTING: "an event's energy and per-job accounting",
    OPT_DECIDED: "opt in or out decided for an event version",
    OPT_HELD: "an opt decision held back",
    OPT_OVERRIDE: "an opt-out by the operator or the BMS",
    OPT_SENT: "an opt sent to the VTN",
    OPT_SENT_TO_VTN: "an opt acknowledged by the VTN",
    OPT_SEND_FAILED: "an opt the VTN did not take",
    OVERRIDE_STANDING: "a standing override set or cleared",
    CONTROL_TICK: "one control tick: reading, target, plan",
    RECONCILE_KEPT: "at start, an actuation kept for an event in force",
    COMMAND_BATTERY: "a battery setpoint commanded and read back",
    COMMAND_GPUS: "GPU caps commanded and read back",
    COMMAND_DSXFLEX: "a load target handed to the DSX Flex agent",
    RELEASE_BATTERY: "the battery returned to normal",
    RELEASE_GPUS: "GPU caps returned to their defaults",
    FAULT_DEVICE: "a device read or write failed",
    FAULT_READBACK: "a device reported other than what was commanded",
    FAULT_LEASE_LAPSED: "a node agent restored its defaults when a lease lapsed",
    DEVICE_RECOVERED: "a device answers again",
    LINK_LOST: "a device link lost",
    LINK_RESTORED: "a device link restored",
    FALLBACK_START: "acting on a fallback while a peer is silent",
    FALLBACK_END: "the fallback is over",
    DSXFLEX_STATUS: "a DSX Flex status",
    DSXFLEX_BREACH: "a DSX Flex breach alert",
    DSXFLEX_ENFORCEMENT: "a DSX Flex enforcement",
    DSXFLEX_HOLD_LAPSED: "a DSX Flex constraint hold lapsed",
    BMS_WRITE: "a BMS write taken",
    BMS_WRITE_REPEATED: "BMS writes that repeated the value in force, counted",
    BMS_WRITE_REFUSED: "BMS writes refused, summed per address",
    BMS_INPUT_LAPSED: "a BMS input lapsed (its time to live ran out)",
    VEN_REGISTERED: "the VEN registered with the VTN",
    VEN_REGISTRATION_REFUSED: "the VTN refused the registration",
    VEN_UNREGISTERED: "the VEN was unregistered",
    VEN_CREATED: "an OpenADR 3 VEN object created",
    VEN_LINK_LOST: "the VTN stopped answering",
    VEN_LINK_RESTORED: "the VTN answers again",
    VEN_CLOCK_SKEW: "the VTN's clock is too far from ours",
    VEN_CLOCK_OK: "the VTN's clock agrees again",
    VEN_MESSAGE_IGNORED: "a message from the VTN ignored",
    XML_IN: "an OpenADR 2.0b message received (digest; the body kept as evidence)",
    XML_OUT: "an OpenADR 2.0b message sent",
    XML_POLL: "an OpenADR 2.0b poll and its answer",
    XML_REJECTED: "a message refused before parsing (hostile or oversized)",
    REPORT_REQUESTED: "a report the VTN asked for",
    REPORT_SENT: "a report sent",
    REPORT_SEND_FAILED: "a report the VTN did not take",
    REPORT_REFUSED: "a report request refused",
    REPORT_CANCELLED: "a report request cancelled",
    REPORT_FAILED: "a report that could not be made",
    OADR3_EXCHANGE: "an OpenADR 3 request and its answer",
    OADR3_REJECTED: "an OpenADR 3 object refused",
    OADR3_DRIFT: "the VTN's API differs from the vendored definition",
    OADR3_PROGRAMS_MISSING: "configured programs the VTN does not have",
    OADR3_NOTIFICATION_UNREADABLE: "an MQTT notification that could not be read",
    OADR3_PUSH: "an MQTT notification taken",
    OADR3_PUSH_READY: "MQTT notifications subscribed",
    OADR3_PUSH_UNAVAILABLE: "MQTT notifications not available; polling",
    OADR3_PUSH_DROPPED: "MQTT notifications dropped",
    OADR3_PUSH_IGNORED: "an MQTT notification ignored",
    AUTH_REFUSED: "management requests refused (bad or missing credentials), summed",
    SECURITY_DSX_REFUSED: "a DSX message refused (signature, schema)",
    OPT_SCHEDULE_SENT: "an opt schedule sent to the VTN (oadrCreateOpt)",
    OPT_SCHEDULE_SEND_FAILED: "an opt schedule the VTN did not take",
    OPT_SCHEDULE_CANCEL_REJECTED: "a cancellation of an opt schedule refused",
    VEN_VEN_ID_REFUSED: "the VTN named another venID: refused",
    VEN_CANCEL_REFUSED: "a cancellation of the registration refused",
    VEN_VTN_ID_DIFFERS: "the VTN answered with another vtnID",
    VEN_HOLD_ENDED: "the hold after a cancelled registration ended",
    VEN_REGISTRATION_CANCELLED: "the registration cancelled (by the VTN or the operator)",
    REPORT_NO_DATA: "a report due with no data to send",
    REPORT_VTN_REGISTERED: "the VTN's report metadata registered",
    REPORT_VTN_REQUESTED: "a report asked of the VTN",
    REPORT_VTN_CANCELLED: "a report asked of the VTN cancelled",
    OPERATOR_OPENADR: "an operator's OpenADR command taken at the management endpoint",
    OPERATOR_CANCEL_REGISTRATION: "the operator cancelled the registration",
    OPERATOR_REGISTER: "the operator asked to register again",
    OPERATOR_QUERY_REGISTRATION: "the operator queried the registration",
    OPERATOR_REQUEST_EVENTS: "the operator asked the VTN for its events",
}


def is_kind(kind: str) -> bool:
    """Return whether ``kind`` is a registered audit record kind."""
    return kind in KINDS
