//! Mapping messages to rows.
#[test]
fn write_json_writes_what_to_json_means() {
    let values = [
        Value::Null,
        Value::Text("a \"quoted\" \u{e9}\n".into()),
        Value::BigInt(-9_000_000_000),
        Value::Integer(7),
        Value::Double(0.1),
        Value::Double(f64::NAN),
        Value::Boolean(false),
        Value::Timestamp(1_700_000_000_123_456),
        Value::Date(-3),
        Value::Json("{\"a\": [1, 2]}".into()),
        Value::Numeric("-12.50".into()),
        Value::Uuid([7; 16]),
        Value::Bytes(vec![0, 1, 255]),
    ];
    for v in values {
        let mut out = Vec::new();
        v.as_ref().write_json(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            serde_json::to_string(&v.as_ref().to_json()).unwrap(),
            "{v:?}"
        );
    }
    assert_eq!(
        ValueRef::Timestamp(1_700_000_000_123_456).to_json(),
        "2023-11-14T22:13:20.123456Z"
    );
    assert_eq!(ValueRef::Date(-3).to_json(), "1969-12-29");
}

#[test]
fn times_written_by_hand_match_chrono() {
    let mut us: i64 = -62_135_596_800_000_000; // 0001-01-01
    let step = 7_919_003_333_331; // about 3 months and odd microseconds
    while us < 253_402_300_799_999_999 {
        let want = chrono::DateTime::from_timestamp_micros(us)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        assert_eq!(ValueRef::Timestamp(us).time_text(), want);
        us += step;
    }
    for d in [-719_162, -1, 0, 59, 60, 11_016, 19_000, 2_932_896] {
        let want = chrono::DateTime::from_timestamp(i64::from(d) * 86_400, 0)
            .unwrap()
            .format("%Y-%m-%d")
            .to_string();
        assert_eq!(ValueRef::Date(d).time_text(), want, "{d}");
    }
    // Before year 0 and past 9999: chrono's own format.
    assert!(ValueRef::Timestamp(-70_000_000_000_000_000)
        .time_text()
        .starts_with('-'));
    assert!(ValueRef::Date(3_000_000).time_text().starts_with('+'));
}

use super::*;

fn col(name: &str, ty: ColumnType, required: bool) -> ColumnConfig {
    ColumnConfig {
        name: name.into(),
        pointer: None,
        ty,
        required,
    }
}

fn msg(v: &str) -> Message {
    Message {
        offset: 7,
        next_offset: 8,
        key: None,
        value: Some(v.as_bytes().to_vec()),
        poison: None,
        meta: Default::default(),
    }
}

/// The columns a mapper has learnt (for the connector as a whole).
fn learnt_names(m: &Mapper) -> Vec<(String, ColumnType)> {
    m.learnt_columns("")
        .unwrap()
        .iter()
        .map(|c| (c.name.clone(), c.ty))
        .collect()
}

fn mapper() -> Mapper {
    let mut nested = col("city", ColumnType::Text, false);
    nested.pointer = Some("/addr/city".into());
    let mut whole = col("doc", ColumnType::Json, false);
    whole.pointer = Some(String::new());
    Mapper::new(
        &[
            col("id", ColumnType::Text, false),
            col("n", ColumnType::Bigint, true),
            col("small", ColumnType::Integer, false),
            col("x", ColumnType::Double, false),
            col("ok", ColumnType::Boolean, false),
            col("at", ColumnType::Timestamp, false),
            col("day", ColumnType::Date, false),
            nested,
            whole,
        ],
        &["id".into()],
        true,
        Some("/deleted".into()),
    )
}

#[test]
fn maps_every_type() {
    let r = mapper()
        .map(&msg(
            r#"{"id":"a","n":5,"small":-3,"x":1.5,"ok":true,"at":"1970-01-01T00:00:01Z","day":"1970-01-11","addr":{"city":"Oslo"}}"#,
        ))
        .unwrap();
    assert_eq!(r.op, Op::Upsert);
    assert_eq!(r.offset, 7);
    assert_eq!(
        r.values.to_values()[..8],
        [
            Value::Text("a".into()),
            Value::BigInt(5),
            Value::Integer(-3),
            Value::Double(1.5),
            Value::Boolean(true),
            Value::Timestamp(1_000_000),
            Value::Date(10),
            Value::Text("Oslo".into()),
        ]
    );
    assert!(matches!(&r.values.to_values()[8], Value::Json(s) if s.contains("\"city\":\"Oslo\"")));
}

#[test]
fn decimals_are_kept_exactly_as_written() {
    for (input, plain) in [
        ("0", "0"),
        ("-0.00", "0.00"),
        ("0012.50", "12.50"),
        ("+7", "7"),
        ("-1.5e3", "-1500"),
        ("1e-2", "0.01"),
        ("12.5E+1", "125"),
        (".5", "0.5"),
        ("5.", "5"),
        (
            "123456789012345678901234567890.000000001",
            "123456789012345678901234567890.000000001",
        ),
    ] {
        assert_eq!(plain_decimal(input).as_deref(), Some(plain), "{input}");
    }
    for bad in [
        "",
        "-",
        ".",
        "1.2.3",
        "1e",
        "0x10",
        "NaN",
        "1,5",
        " 1",
        "1e99999999999999999999",
        "1e1001",
        "1e-1001",
    ] {
        assert_eq!(plain_decimal(bad), None, "{bad}");
    }
}

#[test]
fn numeric_uuid_and_bytes_convert_or_say_what_was_expected() {
    let m = Mapper::new(
        &[
            col("n", ColumnType::Numeric, false),
            col("u", ColumnType::Uuid, false),
            col("b", ColumnType::Bytea, false),
        ],
        &[],
        false,
        None,
    );
    let r = m
        .map(&msg(
            r#"{"n":"-12.50","u":"67E55044-10B1-426F-9247-BB680E5FE0C8","b":"AAEC/w=="}"#,
        ))
        .unwrap();
    assert_eq!(r.values.to_values()[0], Value::Numeric("-12.50".into()));
    assert_eq!(
        r.values.to_values()[1],
        Value::Uuid(*uuid::uuid!("67e55044-10b1-426f-9247-bb680e5fe0c8").as_bytes())
    );
    assert_eq!(r.values.to_values()[2], Value::Bytes(vec![0, 1, 2, 255]));
    let r = m.map(&msg(r#"{"n":2.5}"#)).unwrap();
    assert_eq!(r.values.to_values()[0], Value::Numeric("2.5".into()));
    for (doc, expected) in [
        (r#"{"n":"12,5"}"#, "decimal"),
        (r#"{"n":true}"#, "decimal"),
        (r#"{"u":"not-a-uuid"}"#, "UUID"),
        (r#"{"b":"!!"}"#, "base64"),
    ] {
        let e = m.map(&msg(doc)).unwrap_err();
        assert!(e.reason.contains(expected), "{doc}: {e}");
    }
}

#[test]
fn the_flat_reader_agrees_with_the_general_path() {
    let cols = [
        col("id", ColumnType::Text, false),
        col("n", ColumnType::Bigint, false),
        col("doc", ColumnType::Json, false),
    ];
    let flat = Mapper::new(&cols, &["id".into()], true, Some("/gone".into()));
    assert!(flat.flat.is_some());
    let mut general = Mapper::new(&cols, &["id".into()], true, Some("/gone".into()));
    general.flat = None;
    for doc in [
        r#"{"id":"a","n":1,"doc":{"x":[1,{"y":2}]},"other":[1,2,{"z":null}]}"#,
        r#"{"id":"a","id":"b","n":2}"#,
        r#"{"i\u0064":"esc","n":3}"#,
        r#"{"id":"a","gone":true}"#,
        r#"{"id":"a","gone":"true","n":4}"#,
        r#"{"id":"a","n":null}"#,
        r#"{"n":5}"#,
        r#"{"id":"a","n":"x"}"#,
        "null",
        "[1,2]",
        "\"text\"",
        "7",
        "{}",
        r#"{"id":"a"} trailing"#,
        r#"{"id":"a""#,
        "",
    ] {
        let m = msg(doc);
        assert_eq!(flat.map(&m), general.map(&m), "{doc}");
    }
    // Nested pointers, a whole-document column or a nested tombstone
    // field take the general path.
    let mut nested = col("city", ColumnType::Text, false);
    nested.pointer = Some("/addr/city".into());
    assert!(Mapper::new(&[nested], &[], false, None).flat.is_none());
    assert!(mapper().flat.is_none());
    let m = Mapper::new(&cols, &[], true, Some("/a/gone".into()));
    assert!(m.flat.is_none());
}

#[test]
fn key_timestamp_and_headers_map_to_columns() {
    let mut key = col("k", ColumnType::Text, false);
    key.pointer = Some("@key".into());
    let mut at = col("at", ColumnType::Timestamp, false);
    at.pointer = Some("@timestamp".into());
    let mut ms = col("ms", ColumnType::Bigint, false);
    ms.pointer = Some("@timestamp".into());
    let mut trace = col("trace", ColumnType::Text, true);
    trace.pointer = Some("@header/trace".into());
    let cols = [col("id", ColumnType::Text, false), key, at, ms, trace];
    let flat = Mapper::new(&cols, &[], false, None);
    assert!(flat.flat.is_some());
    let mut general = Mapper::new(&cols, &[], false, None);
    general.flat = None;
    let mut m = msg(r#"{"id":"a","k":"not this","trace":"nor this"}"#);
    m.key = Some(b"user-7".to_vec());
    m.meta.timestamp_ms = Some(1_500);
    m.meta.headers = vec![
        ("trace".into(), b"old".to_vec()),
        ("trace".into(), b"t-1".to_vec()),
    ];
    for mapper in [&flat, &general] {
        let r = mapper.map(&m).unwrap();
        assert_eq!(
            r.values,
            [
                Value::Text("a".into()),
                Value::Text("user-7".into()),
                Value::Timestamp(1_500_000),
                Value::BigInt(1_500),
                Value::Text("t-1".into()),
            ]
        );
    }
    // A required header that is missing, a key that is not text.
    let mut bare = msg(r#"{"id":"a"}"#);
    let e = flat.map(&bare).unwrap_err();
    assert!(
        e.reason.contains("`trace`") && e.reason.contains("@header/trace"),
        "{e}"
    );
    bare.meta.headers = vec![("trace".into(), b"t".to_vec())];
    bare.key = Some(vec![0xff]);
    let e = flat.map(&bare).unwrap_err();
    assert!(e.reason.contains("key is not UTF-8"), "{e}");
}

#[test]
fn optional_missing_fields_are_null() {
    let r = mapper().map(&msg(r#"{"id":"a","n":1}"#)).unwrap();
    assert_eq!(r.values.to_values()[2], Value::Null);
    assert_eq!(r.values.to_values()[7], Value::Null);
}

#[test]
fn errors_name_the_column_and_value() {
    let m = mapper();
    let e = m.map(&msg("{not json")).unwrap_err();
    assert!(e.reason.starts_with("not valid JSON"), "{e}");
    let e = m.map(&msg(r#"{"id":"a"}"#)).unwrap_err();
    assert!(e.reason.contains("required column `n`"), "{e}");
    let e = m.map(&msg(r#"{"n":1}"#)).unwrap_err();
    assert!(e.reason.contains("key column `id`"), "{e}");
    let e = m.map(&msg(r#"{"id":"a","n":"12x"}"#)).unwrap_err();
    assert!(
        e.reason.contains("column `n`") && e.reason.contains("\"12x\""),
        "{e}"
    );
    let e = m
        .map(&msg(r#"{"id":"a","n":1,"small":3000000000}"#))
        .unwrap_err();
    assert!(e.reason.contains("32-bit"), "{e}");
    let e = m
        .map(&msg(r#"{"id":"a","n":1,"at":"yesterday"}"#))
        .unwrap_err();
    assert!(e.reason.contains("RFC 3339"), "{e}");
    // Kept as written, 1e400 would be infinity as a double.
    let e = m.map(&msg(r#"{"id":"a","n":1,"x":1e400}"#)).unwrap_err();
    assert!(e.reason.contains("finite"), "{e}");
    // A big integer stays exact in a json column.
    let r = m
        .map(&msg(
            r#"{"id":"a","n":1,"x":2.5,"big":98765432109876543210}"#,
        ))
        .unwrap();
    assert!(
        r.values.to_values().contains(&Value::Double(2.5)),
        "{:?}",
        r.values
    );
}

#[test]
fn pointers_follow_rfc_6901() {
    let mut doc: Json = serde_json::from_str(r#"{"a/b":{"~x":[10,20]},"":1}"#).unwrap();
    assert_eq!(
        lookup_mut(&mut doc, &tokens("/a~1b/~0x/1")),
        Some(&mut Json::from(20))
    );
    assert_eq!(lookup_mut(&mut doc, &tokens("/")), Some(&mut Json::from(1)));
    assert!(lookup_mut(&mut doc, &tokens("/a~1b/~0x/9")).is_none());
    assert!(lookup_mut(&mut doc, &tokens("")).is_some_and(|v| v.is_object()));
}

#[test]
fn overlapping_pointers_are_copied_not_moved() {
    assert!(disjoint(&["/a", "/b", "/ab"]));
    assert!(!disjoint(&["/a", "/a/b"]));
    assert!(!disjoint(&["/a", ""]));
    assert!(!disjoint(&["/a", "/a"]));
    // `mapper()` has the whole document as a column: both see the field.
    let r = mapper().map(&msg(r#"{"id":"a","n":1}"#)).unwrap();
    assert_eq!(r.values.to_values()[0], Value::Text("a".into()));
    assert!(matches!(&r.values.to_values()[8], Value::Json(s) if s.contains("\"id\":\"a\"")));
    let m = Mapper::new(
        &[
            col("id", ColumnType::Text, true),
            col("n", ColumnType::Bigint, true),
        ],
        &[],
        false,
        None,
    );
    assert!(m.disjoint);
    let r = m.map(&msg(r#"{"id":"a","n":1}"#)).unwrap();
    assert_eq!(r.values, [Value::Text("a".into()), Value::BigInt(1)]);
}

#[test]
fn tombstones_need_only_the_key() {
    let r = mapper().map(&msg(r#"{"id":"a","deleted":true}"#)).unwrap();
    assert_eq!(r.op, Op::Delete);
    assert_eq!(r.values.to_values()[0], Value::Text("a".into()));
    assert!(r.values.to_values()[1..].iter().all(|v| *v == Value::Null));
    let r = mapper()
        .map(&msg(r#"{"id":"a","n":1,"deleted":false}"#))
        .unwrap();
    assert_eq!(r.op, Op::Upsert);
}

fn debezium() -> Mapper {
    Mapper::new(
        &[
            col("id", ColumnType::Bigint, false),
            col("name", ColumnType::Text, false),
        ],
        &["id".into()],
        true,
        None,
    )
    .with_envelope(Envelope::Debezium)
}

fn keyed(key: &str, value: Option<&str>) -> Message {
    let mut m = msg(value.unwrap_or(""));
    m.key = Some(key.as_bytes().to_vec());
    m.value = value.map(|v| v.as_bytes().to_vec());
    m
}

#[test]
fn debezium_creates_reads_and_updates_write_after() {
    let m = debezium();
    for op in ["c", "r", "u"] {
        let event = format!(
            r#"{{"before":{{"id":1,"name":"old"}},"after":{{"id":1,"name":"new"}},"source":{{"lsn":5}},"op":"{op}","ts_ms":1}}"#
        );
        let r = m.map(&msg(&event)).unwrap();
        assert_eq!(r.op, Op::Upsert, "{op}");
        assert_eq!(
            r.values,
            vec![Value::BigInt(1), Value::Text("new".into())],
            "{op}"
        );
    }
}

#[test]
fn debezium_with_the_converters_schema_wrapper_reads_its_payload() {
    let event = r#"{"schema":{"type":"struct","fields":[]},"payload":{"before":null,"after":{"id":2,"name":"b"},"op":"c"}}"#;
    let r = debezium().map(&msg(event)).unwrap();
    assert_eq!(r.values, vec![Value::BigInt(2), Value::Text("b".into())]);
}

#[test]
fn debezium_deletes_by_before_or_else_by_the_key() {
    let m = debezium();
    let with_before = r#"{"before":{"id":3,"name":null},"after":null,"op":"d"}"#;
    let r = m.map(&keyed(r#"{"id":3}"#, Some(with_before))).unwrap();
    assert_eq!(
        (r.op, &r.values.to_values()[0]),
        (Op::Delete, &Value::BigInt(3))
    );
    // Replica identity NOTHING: no `before`; the key (schema-wrapped here)
    // names the row.
    let without = r#"{"before":null,"after":null,"op":"d"}"#;
    let key = r#"{"schema":{"type":"struct"},"payload":{"id":4}}"#;
    let r = m.map(&keyed(key, Some(without))).unwrap();
    assert_eq!(
        (r.op, &r.values.to_values()[0]),
        (Op::Delete, &Value::BigInt(4))
    );
    assert!(m.map(&msg(without)).is_err(), "no before and no key");
}

#[test]
fn debezium_skips_the_tombstone_after_a_delete_and_refuses_what_it_cannot_apply() {
    let m = debezium();
    assert!(m.skips(&keyed(r#"{"id":3}"#, None)));
    assert!(!m.skips(&msg(r#"{"op":"c"}"#)));
    // Without the envelope a null value is a tombstone to map, not skip.
    assert!(!mapper().skips(&keyed("k", None)));
    let truncate = m.map(&msg(r#"{"op":"t","before":null,"after":null}"#));
    assert!(truncate.unwrap_err().reason.contains("truncate"));
    let not_an_event = m.map(&msg(r#"{"id":1,"name":"plain"}"#));
    assert!(not_an_event.unwrap_err().reason.contains("no `op`"));
    let no_after = m.map(&msg(r#"{"op":"c","after":null}"#));
    assert!(no_after.unwrap_err().reason.contains("without `after`"));
    // The row's own fields still go through the column types.
    let bad = m.map(&msg(r#"{"op":"c","after":{"id":"x","name":"a"}}"#));
    assert!(bad.unwrap_err().reason.contains("column `id`"));
}

#[test]
fn debezium_source_fields_and_op_map_on_upserts_and_deletes() {
    let mut lsn = col("lsn", ColumnType::Bigint, false);
    lsn.pointer = Some("@source/lsn".into());
    let mut op = col("op", ColumnType::Text, false);
    op.pointer = Some("@op".into());
    let mut table = col("tbl", ColumnType::Text, false);
    table.pointer = Some("@source/table".into());
    let m = Mapper::new(
        &[
            col("id", ColumnType::Bigint, false),
            lsn,
            op,
            table,
            col("name", ColumnType::Text, false),
        ],
        &["id".into(), "lsn".into()],
        true,
        None,
    )
    .with_envelope(Envelope::Debezium);
    let update = r#"{"before":null,"after":{"id":1,"name":"a"},"source":{"lsn":42,"table":"customers"},"op":"u"}"#;
    let r = m.map(&msg(update)).unwrap();
    assert_eq!(
        r.values,
        vec![
            Value::BigInt(1),
            Value::BigInt(42),
            Value::Text("u".into()),
            Value::Text("customers".into()),
            Value::Text("a".into())
        ]
    );
    // A delete keeps what describes the change (its LSN, op, table): the
    // version guard compares the delete's LSN with the row's.
    let delete = r#"{"before":{"id":1,"name":"a"},"after":null,"source":{"lsn":43,"table":"customers"},"op":"d"}"#;
    let r = m.map(&msg(delete)).unwrap();
    assert_eq!(r.op, Op::Delete);
    assert_eq!(
        r.values,
        vec![
            Value::BigInt(1),
            Value::BigInt(43),
            Value::Text("d".into()),
            Value::Text("customers".into()),
            Value::Null
        ]
    );
    // The version column is required like a key: an event without it is
    // refused, not applied unguarded.
    let no_lsn = r#"{"after":{"id":1,"name":"a"},"source":{},"op":"c"}"#;
    let e = m.map(&msg(no_lsn)).unwrap_err();
    assert!(e.reason.contains("@source/lsn"), "{}", e.reason);
}

#[test]
fn debezium_into_a_sink_without_deletes_is_a_change_log() {
    let mut op = col("op", ColumnType::Text, false);
    op.pointer = Some("@op".into());
    let m = Mapper::new(
        &[
            col("id", ColumnType::Bigint, false),
            op,
            col("name", ColumnType::Text, false),
        ],
        &[],
        false,
        None,
    )
    .with_envelope(Envelope::Debezium);
    let delete = r#"{"before":{"id":1,"name":"a"},"after":null,"op":"d"}"#;
    let r = m.map(&msg(delete)).unwrap();
    assert_eq!(r.op, Op::Upsert, "a row of the log, not a delete");
    assert_eq!(
        r.values,
        vec![
            Value::BigInt(1),
            Value::Text("d".into()),
            Value::Text("a".into())
        ]
    );
    let create = r#"{"before":null,"after":{"id":2,"name":"b"},"op":"c"}"#;
    assert_eq!(
        m.map(&msg(create)).unwrap().values.to_values()[1],
        Value::Text("c".into())
    );
}

#[test]
fn debezium_with_schemas_decodes_logical_types() {
    let m = Mapper::new(
        &[
            col("id", ColumnType::Bigint, false),
            col("born", ColumnType::Date, false),
            col("price", ColumnType::Numeric, false),
        ],
        &["id".into()],
        true,
        None,
    )
    .with_envelope(Envelope::Debezium);
    let event = r#"{"schema":{"type":"struct","fields":[
        {"field":"after","type":"struct","fields":[
          {"field":"id","type":"int64"},
          {"field":"born","type":"int32","name":"io.debezium.time.Date"},
          {"field":"price","type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"}}]}]},
      "payload":{"before":null,"after":{"id":1,"born":20454,"price":"+y4="},"op":"c"}}"#;
    let r = m.map(&msg(event)).unwrap();
    assert_eq!(
        r.values,
        vec![
            Value::BigInt(1),
            Value::Date(20454),
            Value::Numeric("-12.34".into())
        ]
    );
    // The same value without the schema is refused, not misread.
    let bare = r#"{"before":null,"after":{"id":1,"born":20454,"price":"+y4="},"op":"c"}"#;
    assert!(m.map(&msg(bare)).is_err());
}

/// A change event with a schema whose `after` has `fields` (JSON).
fn with_schema(fields: &str, after: &str, op: &str) -> Message {
    msg(&format!(
        r#"{{"schema":{{"type":"struct","fields":[
            {{"field":"before","type":"struct","optional":true,"fields":{fields}}},
            {{"field":"after","type":"struct","optional":true,"fields":{fields}}}]}},
          "payload":{{"before":null,"after":{after},"op":"{op}","source":{{"lsn":9}}}}}}"#
    ))
}

fn learning() -> Mapper {
    let mut lsn = col("lsn", ColumnType::Bigint, false);
    lsn.pointer = Some("@source/lsn".into());
    let listed = [col("id", ColumnType::Bigint, false), lsn];
    Mapper::new(&listed, &["id".into()], true, None)
        .with_envelope(Envelope::Debezium)
        .learning_columns(&listed, ColumnType::Text)
}

#[test]
fn learning_columns_adds_each_new_field_of_the_schema() {
    let m = learning();
    let v1 = r#"[{"field":"id","type":"int64"},{"field":"name","type":"string","optional":true},
        {"field":"price","type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"}}]"#;
    let r = m
        .map(&with_schema(
            v1,
            r#"{"id":1,"name":"a","price":"BNI="}"#,
            "c",
        ))
        .unwrap();
    // Listed columns first, then the schema's other fields in its order;
    // the decimal lands as the sink's type (text here), digits exact.
    assert_eq!(
        r.values,
        vec![
            Value::BigInt(1),
            Value::BigInt(9),
            Value::Text("a".into()),
            Value::Text("12.34".into())
        ]
    );
    assert_eq!(
        learnt_names(&m)[2..],
        [
            ("name".to_string(), ColumnType::Text),
            ("price".to_string(), ColumnType::Text)
        ]
    );
    // A column added in the source: one more column, later records wider.
    let v2 = r#"[{"field":"id","type":"int64"},{"field":"name","type":"string","optional":true},
        {"field":"price","type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"}},
        {"field":"born","type":"int32","optional":true,"name":"io.debezium.time.Date"}]"#;
    let r = m
        .map(&with_schema(
            v2,
            r#"{"id":2,"name":"b","price":"BNI=","born":20454}"#,
            "u",
        ))
        .unwrap();
    assert_eq!(r.values.len(), 5);
    assert_eq!(r.values.to_values()[4], Value::Date(20454));
    assert_eq!(learnt_names(&m).len(), 5);
    // An event from before the change still maps (its row lacks the field).
    let old = m
        .map(&with_schema(
            v1,
            r#"{"id":3,"name":"c","price":"BNI="}"#,
            "c",
        ))
        .unwrap();
    assert_eq!(old.values.to_values()[4], Value::Null);
}

#[test]
fn learning_columns_stops_on_a_type_change_and_an_unfit_name() {
    let m = learning();
    let v1 = r#"[{"field":"id","type":"int64"},{"field":"qty","type":"int32"}]"#;
    m.map(&with_schema(v1, r#"{"id":1,"qty":2}"#, "c")).unwrap();
    let v2 = r#"[{"field":"id","type":"int64"},{"field":"qty","type":"string"}]"#;
    let e = m
        .map(&with_schema(v2, r#"{"id":1,"qty":"2"}"#, "u"))
        .unwrap_err();
    assert!(e.stop, "{e}");
    assert!(
        e.reason.contains("`qty`") && e.reason.contains("integer") && e.reason.contains("text"),
        "{e}"
    );
    // Remembering settled schemas never hides the change: the old schema
    // still maps, the new one still stops.
    m.map(&with_schema(v1, r#"{"id":1,"qty":3}"#, "u")).unwrap();
    let again = m
        .map(&with_schema(v2, r#"{"id":1,"qty":"2"}"#, "u"))
        .unwrap_err();
    assert!(again.stop, "{again}");
    // A listed column's type overrides the schema's: no stop.
    let v3 = r#"[{"field":"id","type":"int32"},{"field":"qty","type":"int32"}]"#;
    m.map(&with_schema(v3, r#"{"id":1,"qty":2}"#, "u")).unwrap();
    let bad = r#"[{"field":"id","type":"int64"},{"field":"_idem_x","type":"int32"}]"#;
    let e = m
        .map(&with_schema(bad, r#"{"id":1,"_idem_x":2}"#, "u"))
        .unwrap_err();
    assert!(e.stop && e.reason.contains("_idem_x"), "{e}");
    // An event without its schema is the message's fault: a dead letter.
    let e = m
        .map(&msg(r#"{"before":null,"after":{"id":1},"op":"c"}"#))
        .unwrap_err();
    assert!(!e.stop && e.reason.contains("schemas.enable"), "{e}");
}

#[test]
fn learning_the_key_takes_the_message_keys_fields_per_route() {
    let mut lsn = col("lsn", ColumnType::Bigint, false);
    lsn.pointer = Some("@source/lsn".into());
    let listed = [lsn];
    let m = Mapper::new(&listed, &[], true, None)
        .with_envelope(Envelope::Debezium)
        .learning_columns(&listed, ColumnType::Text)
        .learning_key();
    let orders = r#"[{"field":"region","type":"string"},{"field":"order_number","type":"int32"},{"field":"qty","type":"int32","optional":true}]"#;
    let keyed_as = |key: &str, m: Message| Message {
        key: Some(key.as_bytes().to_vec()),
        ..m
    };
    // The key's fields in the key's order (not the row's, not sorted),
    // with and without the converter's schema wrapper.
    let key = r#"{"schema":{"type":"struct","fields":[{"field":"region","type":"string"},{"field":"order_number","type":"int32"}]},"payload":{"region":"eu","order_number":7}}"#;
    let r = m
        .map_in(
            &keyed_as(
                key,
                with_schema(orders, r#"{"region":"eu","order_number":7,"qty":1}"#, "c"),
            ),
            "orders",
        )
        .unwrap();
    assert_eq!(r.values.len(), 4);
    assert_eq!(
        m.learnt_key("orders").unwrap().as_slice(),
        ["region".to_string(), "order_number".to_string()]
    );
    assert_eq!(m.learnt_key("customers"), None);
    let bare = keyed_as(
        r#"{"region":"eu","order_number":8}"#,
        with_schema(
            orders,
            r#"{"region":"eu","order_number":8,"qty":null}"#,
            "u",
        ),
    );
    m.map_in(&bare, "orders").unwrap();
    // Another route learns its own key.
    let customers = r#"[{"field":"id","type":"int64"},{"field":"email","type":"string"}]"#;
    m.map_in(
        &keyed_as(
            r#"{"id":1}"#,
            with_schema(customers, r#"{"id":1,"email":"a@b"}"#, "c"),
        ),
        "customers",
    )
    .unwrap();
    assert_eq!(
        m.learnt_key("customers").unwrap().as_slice(),
        ["id".to_string()]
    );
    // Key columns are required: a null key field is the message's fault.
    let e = m
        .map_in(
            &keyed_as(
                r#"{"region":"eu","order_number":9}"#,
                with_schema(orders, r#"{"region":null,"order_number":9,"qty":1}"#, "c"),
            ),
            "orders",
        )
        .unwrap_err();
    assert!(!e.stop && e.reason.contains("key column `region`"), "{e}");
    // A delete keeps only the key (and event) columns.
    let d = m
        .map_in(
            &keyed_as(
                r#"{"region":"eu","order_number":7}"#,
                msg(&format!(
                    r#"{{"schema":{{"type":"struct","fields":[
                    {{"field":"before","type":"struct","optional":true,"fields":{orders}}},
                    {{"field":"after","type":"struct","optional":true,"fields":{orders}}}]}},
                    "payload":{{"before":{{"region":"eu","order_number":7,"qty":1}},"after":null,"op":"d","source":{{"lsn":10}}}}}}"#
                )),
            ),
            "orders",
        )
        .unwrap();
    assert_eq!(d.op, Op::Delete);
    assert_eq!(
        d.values,
        vec![
            Value::BigInt(10),
            Value::Text("eu".into()),
            Value::Integer(7),
            Value::Null
        ]
    );
    // The key changing, a key field the row lacks, or no key at all stop
    // the connector: each would key the table wrongly.
    let e = m
        .map_in(
            &keyed_as(
                r#"{"order_number":7}"#,
                with_schema(orders, r#"{"region":"eu","order_number":7,"qty":1}"#, "u"),
            ),
            "orders",
        )
        .unwrap_err();
    assert!(
        e.stop
            && e.reason.contains("(region, order_number)")
            && e.reason.contains("(order_number)"),
        "{e}"
    );
    let e = m
        .map_in(
            &keyed_as(
                r#"{"sku":1}"#,
                with_schema(orders, r#"{"region":"eu","order_number":7,"qty":1}"#, "c"),
            ),
            "items",
        )
        .unwrap_err();
    assert!(e.stop && e.reason.contains("`sku`"), "{e}");
    let e = m
        .map_in(
            &with_schema(orders, r#"{"region":"eu","order_number":7,"qty":1}"#, "c"),
            "logs",
        )
        .unwrap_err();
    assert!(e.stop && e.reason.contains("no primary key"), "{e}");
    // A key that is not an object is the message's fault.
    let e = m
        .map_in(
            &keyed_as(
                "7",
                with_schema(orders, r#"{"region":"eu","order_number":7,"qty":1}"#, "c"),
            ),
            "orders",
        )
        .unwrap_err();
    assert!(!e.stop, "{e}");
}

#[test]
fn columns_from_the_table_map_events_without_a_schema_by_name() {
    let mut lsn = col("lsn", ColumnType::Bigint, false);
    lsn.pointer = Some("@source/lsn".into());
    let listed = [col("id", ColumnType::Bigint, false), lsn];
    let m = Mapper::new(&listed, &["id".into()], true, None)
        .with_envelope(Envelope::Debezium)
        .columns_from_table(&listed);
    let event = r#"{"before":null,"after":{"id":1,"name":"a","born":"2024-01-02","gone":5},"op":"c","source":{"lsn":9}}"#;
    // Before the table's columns are known: the listed ones only.
    assert_eq!(m.map(&msg(event)).unwrap().values.len(), 2);
    // The table's columns follow the listed ones, in its order; one the
    // listed columns read already (`id`) is not taken twice, and a field
    // the table lacks (`gone`) is not written.
    m.seed(
        "",
        &[
            ("id".into(), ColumnType::Integer),
            ("born".into(), ColumnType::Date),
            ("name".into(), ColumnType::Text),
            ("extra".into(), ColumnType::Bigint),
        ],
    )
    .unwrap();
    let r = m.map(&msg(event)).unwrap();
    assert_eq!(
        r.values,
        vec![
            Value::BigInt(1),
            Value::BigInt(9),
            Value::Date(19724),
            Value::Text("a".into()),
            Value::Null
        ]
    );
    let names: Vec<String> = m
        .learnt_columns("")
        .unwrap()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(names, ["id", "lsn", "born", "name", "extra"]);
    // A field of the wrong type names its column.
    let e = m
        .map(&msg(
            r#"{"after":{"id":2,"name":"b","born":"soon"},"op":"u","source":{"lsn":10}}"#,
        ))
        .unwrap_err();
    assert!(e.reason.contains("`born`"), "{e}");
    // A table column no column can be is refused, named.
    assert!(m
        .seed("", &[("_idem_x".into(), ColumnType::Text)])
        .unwrap_err()
        .contains("_idem_x"));
}

#[test]
fn with_schemas_too_the_tables_columns_keep_their_types() {
    let listed = [col("id", ColumnType::Bigint, false)];
    let m = Mapper::new(&listed, &["id".into()], true, None)
        .with_envelope(Envelope::Debezium)
        .learning_columns(&listed, ColumnType::Text)
        .columns_from_table(&listed);
    m.seed("", &[("qty".into(), ColumnType::Integer)]).unwrap();
    // The schema says int64 where the table has integer: the table's type
    // wins, as a listed column's would; a field the table lacks is learnt.
    let fields = r#"[{"field":"id","type":"int64"},{"field":"qty","type":"int64"},{"field":"note","type":"string","optional":true}]"#;
    let r = m
        .map(&with_schema(fields, r#"{"id":1,"qty":2,"note":"n"}"#, "c"))
        .unwrap();
    assert_eq!(
        r.values,
        vec![Value::BigInt(1), Value::Integer(2), Value::Text("n".into())]
    );
    // Without a schema, the same table columns (and what was learnt).
    let r = m
        .map(&msg(r#"{"after":{"id":2,"qty":3,"note":"m"},"op":"u"}"#))
        .unwrap();
    assert_eq!(
        r.values,
        vec![Value::BigInt(2), Value::Integer(3), Value::Text("m".into())]
    );
    // A learnt column still stops on a type change.
    let changed = r#"[{"field":"id","type":"int64"},{"field":"note","type":"int32"}]"#;
    let e = m
        .map(&with_schema(changed, r#"{"id":1,"note":5}"#, "u"))
        .unwrap_err();
    assert!(e.stop && e.reason.contains("`note`"), "{e}");
}

#[test]
fn a_learnt_key_names_the_column_that_reads_each_key_field() {
    // `order_number` is listed under another name: the table's key is
    // that column, and later events with the same key fields map as ever.
    let mut num = col("num", ColumnType::Bigint, false);
    num.pointer = Some("/order_number".into());
    let listed = [num];
    let m = Mapper::new(&listed, &[], true, None)
        .with_envelope(Envelope::Debezium)
        .learning_columns(&listed, ColumnType::Text)
        .learning_key();
    let fields = r#"[{"field":"order_number","type":"int32"},{"field":"qty","type":"int32","optional":true}]"#;
    for (i, op) in [(1, "c"), (2, "u")] {
        let event = Message {
            key: Some(format!(r#"{{"order_number":{i}}}"#).into_bytes()),
            ..with_schema(fields, &format!(r#"{{"order_number":{i},"qty":3}}"#), op)
        };
        let r = m.map_in(&event, "orders").unwrap();
        assert_eq!(r.values.to_values()[0], Value::BigInt(i));
    }
    assert_eq!(
        m.learnt_key("orders").unwrap().as_slice(),
        ["num".to_string()]
    );
}

#[test]
fn registry_values_decode_with_the_schema_of_their_id() {
    let v1 = r#"{"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]}"#;
    let v2 = r#"{"type": "record", "name": "R", "fields": [
        {"name": "id", "type": "long"}, {"name": "note", "type": ["null", "string"], "default": null}]}"#;
    let schemas = std::sync::Arc::new(registry::RegistrySchemas::default());
    let m = Mapper::new(
        &[
            col("id", ColumnType::Bigint, true),
            col("note", ColumnType::Text, false),
        ],
        &["id".into()],
        false,
        None,
    )
    .with_registry(schemas.clone());
    // The wire format: 0, the id (big-endian), the value.
    let framed = |id: u32, schema: &str, doc: serde_json::Value| {
        let mut out = vec![0];
        out.extend(id.to_be_bytes());
        out.extend(
            avro::AvroSchema::parse(schema)
                .unwrap()
                .encode(&doc)
                .unwrap(),
        );
        Message {
            value: Some(out),
            ..msg("")
        }
    };
    let one = framed(1, v1, serde_json::json!({"id": 5}));
    let two = framed(300, v2, serde_json::json!({"id": 6, "note": "hi"}));
    // An id not fetched yet stops the connector: mapping never guesses.
    let e = m.map(&one).unwrap_err();
    assert!(e.stop && e.reason.contains("schema id 1"), "{}", e.reason);
    schemas.insert(
        1,
        registry::Writer::Avro(Box::new(avro::AvroSchema::parse(v1).unwrap())),
    );
    schemas.insert(
        300,
        registry::Writer::Avro(Box::new(avro::AvroSchema::parse(v2).unwrap())),
    );
    assert_eq!(m.map(&one).unwrap().values, [Value::BigInt(5), Value::Null]);
    assert_eq!(
        m.map(&two).unwrap().values,
        [Value::BigInt(6), Value::Text("hi".into())]
    );
    // Not the wire format, or not a value of the schema its id names: a
    // dead letter that says so, with the id.
    let e = m.map(&msg("{\"id\": 5}")).unwrap_err();
    assert!(
        !e.stop && e.reason.contains("starts with byte 0x7b"),
        "{}",
        e.reason
    );
    let mut cut = two.clone();
    cut.value.as_mut().unwrap().truncate(7);
    let e = m.map(&cut).unwrap_err();
    assert!(
        !e.stop && e.reason.contains("schema id 300: not an Avro value"),
        "{}",
        e.reason
    );
    let e = m
        .map(&Message {
            value: Some(vec![0, 0, 1]),
            ..msg("")
        })
        .unwrap_err();
    assert!(
        e.reason.contains("shorter than its 5-byte prefix"),
        "{}",
        e.reason
    );
}

#[test]
fn registry_values_with_evolve_add_the_columns_a_new_writer_schema_brings() {
    let v1 = r#"{"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]}"#;
    let v2 = r#"{"type": "record", "name": "R", "fields": [
        {"name": "id", "type": "long"}, {"name": "note", "type": ["null", "string"], "default": null},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}}]}"#;
    let v3 = r#"{"type": "record", "name": "R", "fields": [
        {"name": "id", "type": "long"}, {"name": "note", "type": "long"}]}"#;
    let schemas = std::sync::Arc::new(registry::RegistrySchemas::default());
    for (id, text) in [(1, v1), (2, v2), (3, v3)] {
        schemas.insert(
            id,
            registry::Writer::Avro(Box::new(avro::AvroSchema::parse(text).unwrap())),
        );
    }
    let listed = [col("id", ColumnType::Bigint, true)];
    let m = Mapper::new(&listed, &["id".into()], false, None)
        .learning_columns(&listed, ColumnType::Text)
        .with_registry(schemas);
    let framed = |id: u32, text: &str, doc: serde_json::Value| Message {
        value: Some(
            [
                vec![0],
                id.to_be_bytes().to_vec(),
                avro::AvroSchema::parse(text).unwrap().encode(&doc).unwrap(),
            ]
            .concat(),
        ),
        ..msg("")
    };
    assert_eq!(
        m.map(&framed(1, v1, serde_json::json!({"id": 1})))
            .unwrap()
            .values,
        [Value::BigInt(1)]
    );
    assert_eq!(learnt_names(&m), [("id".into(), ColumnType::Bigint)]);
    // Version 2 adds two fields: two columns, the decimal as the sink's
    // decimal type (text here); a value of version 1 still maps.
    let r = m
        .map(&framed(
            2,
            v2,
            serde_json::json!({"id": 2, "note": "hi", "price": "1.50"}),
        ))
        .unwrap();
    assert_eq!(
        r.values,
        [
            Value::BigInt(2),
            Value::Text("hi".into()),
            Value::Text("1.50".into())
        ]
    );
    assert_eq!(
        learnt_names(&m),
        [
            ("id".into(), ColumnType::Bigint),
            ("note".into(), ColumnType::Text),
            ("price".into(), ColumnType::Text)
        ]
    );
    let r = m.map(&framed(1, v1, serde_json::json!({"id": 3}))).unwrap();
    assert_eq!(r.values, [Value::BigInt(3), Value::Null, Value::Null]);
    // Version 3 changes `note` to a long: the connector stops, naming both.
    let e = m
        .map(&framed(3, v3, serde_json::json!({"id": 4, "note": 5})))
        .unwrap_err();
    assert!(e.stop, "{}", e.reason);
    assert!(
        e.reason.contains("schema id 3")
            && e.reason.contains("`note` changed type")
            && e.reason.contains("it was text, it is now bigint"),
        "{}",
        e.reason
    );
}
