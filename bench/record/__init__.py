"""The record: the one contract between a run and analysis. Its files and statuses, atomic writing, reading
(store.py) and provenance (provenance.py)."""
from bench.record.store import (
    CURVE_FILE,
    FAILED_ATTEMPT_FILE,
    FAILED_STATUSES,
    KNOWN_SCHEMAS,
    OK,
    RECORD_FILE,
    SCHEMA_VERSION,
    STATUSES,
    TRACEBACK_FILE,
    WEIGHTS_DIR,
    check_writable,
    config_group,
    find_records,
    load_records,
    read_record,
    record_path,
    write_json_atomic,
    write_record,
    write_result,
)

__all__ = ["CURVE_FILE", "FAILED_ATTEMPT_FILE", "FAILED_STATUSES", "KNOWN_SCHEMAS", "OK", "RECORD_FILE",
           "SCHEMA_VERSION", "STATUSES", "TRACEBACK_FILE", "WEIGHTS_DIR", "check_writable", "config_group",
           "find_records", "load_records", "read_record", "record_path", "write_json_atomic", "write_record",
           "write_result"]
