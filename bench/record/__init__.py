"""The record: the one contract between a run and analysis. Its typed schema (schema.py), the identity it is keyed
by (identity.py), reading, writing and migrating (store.py) and provenance (provenance.py)."""
from bench.record.identity import config_group, config_hash, run_id
from bench.record.schema import FAILED_STATUSES, OK, SCHEMA_VERSION, STATUSES, Record
from bench.record.store import (
    CURVE_FILE,
    FAILED_ATTEMPT_FILE,
    KNOWN_SCHEMAS,
    RECORD_FILE,
    SAMPLES_FILE,
    TRACEBACK_FILE,
    WEIGHTS_DIR,
    SchemaError,
    as_dict,
    check_writable,
    find_records,
    load_records,
    migrate,
    read_record,
    record_path,
    validate,
    write_json_atomic,
    write_jsonl,
    write_record,
    write_result,
)

__all__ = ["CURVE_FILE", "FAILED_ATTEMPT_FILE", "FAILED_STATUSES", "KNOWN_SCHEMAS", "OK", "RECORD_FILE",
           "SAMPLES_FILE", "SCHEMA_VERSION", "STATUSES", "TRACEBACK_FILE", "WEIGHTS_DIR", "Record", "SchemaError",
           "as_dict", "check_writable", "config_group", "config_hash", "find_records", "load_records", "migrate",
           "read_record", "record_path", "run_id", "validate", "write_json_atomic", "write_jsonl", "write_record",
           "write_result"]
