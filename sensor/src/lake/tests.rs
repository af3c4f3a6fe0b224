//! The Parquet export without a kernel: the schema against the event
//! model, the files against Security Lake's rules, and what a killed
//! sensor leaves. (The live run, read back with DuckDB, is
//! `sensor/tests/parquet.rs`.)

use std::{fs::File, os::unix::fs::PermissionsExt, path::Path};

use arrow_array::{Array, Int64Array};
use arrow_schema::DataType;
use keywarden_analyzer::event::{Event, Origin, class};
use parquet::{
    arrow::arrow_reader::ParquetRecordBatchReaderBuilder,
    basic::Compression,
    file::reader::{FileReader, SerializedFileReader},
};

use super::*;

/// The fullest event the model can hold (every optional field set, every
/// list one item long), traced from the type itself: a field the model
/// gains is in it without this test changing.
fn full_event(class_uid: u32, time: i64, seq: u64) -> Event {
    let mut ev: Event = serde_json::from_value(schema::full_sample::<Event>())
        .expect("the model deserializes its own fullest sample");
    ev.class_uid = class_uid;
    ev.time = time;
    ev.metadata.uid = format!("u-{seq}");
    ev
}

fn origin() -> Origin {
    Origin {
        hostname: "h".into(),
        product_version: "0".into(),
        uid_prefix: "p".into(),
    }
}

fn writer(dir: &Path, roll_bytes: usize) -> Writer {
    let schema = Arc::new(schema::trace::<Event>().unwrap());
    Writer {
        root: Root::open(dir).unwrap(),
        fields: schema.fields().iter().cloned().collect(),
        schema,
        region: "eu-west-1".into(),
        account: "external".into(),
        roll: Duration::from_secs(300),
        roll_bytes,
        prefix: "test".into(),
        seq: 0,
        open: HashMap::new(),
        stats: Arc::new(Stats::default()),
        failing: false,
    }
}

/// Every `.parquet` file under `dir`, sorted, and every other file.
fn files_under(dir: &Path) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    let (mut parquet, mut other) = (Vec::new(), Vec::new());
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            if p.symlink_metadata().unwrap().is_dir() {
                stack.push(p);
            } else if name.ends_with(".parquet") && !name.starts_with('.') {
                parquet.push(p);
            } else if name != ".keywarden.lock" {
                other.push(p);
            }
        }
    }
    parquet.sort();
    (parquet, other)
}

fn read_rows(path: &Path) -> Vec<arrow_array::RecordBatch> {
    ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The schema is the model's, nested: structs and lists, JSON text only
/// where OCSF says json.
#[test]
fn the_schema_is_traced_from_the_event_model_and_nested() {
    let schema = schema::trace::<Event>().unwrap();
    assert_eq!(schema::json_columns(&schema), schema::JSON_COLUMNS);
    let time = schema.field_with_name("time").unwrap();
    assert_eq!(time.data_type(), &DataType::Int64);
    for nested in ["metadata", "actor", "device"] {
        assert!(
            matches!(
                schema.field_with_name(nested).unwrap().data_type(),
                DataType::Struct(_)
            ),
            "{nested} is a struct"
        );
    }
    assert!(matches!(
        schema.field_with_name("evidences").unwrap().data_type(),
        DataType::List(_)
    ));
    // Every top-level attribute the model serializes is a column, by the
    // same name, in the same order.
    let json = serde_json::to_value(full_event(class::MODULE_ACTIVITY, 1, 1)).unwrap();
    let serialized: Vec<&String> = json.as_object().unwrap().keys().collect();
    let mut columns: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
    columns.sort();
    let mut serialized_sorted = serialized.clone();
    serialized_sorted.sort();
    assert_eq!(columns, serialized_sorted);
}

/// Every kind of event, and the fullest event the model can hold, makes a
/// row: a model change that the schema cannot carry fails here, not in a
/// running sensor.
#[test]
fn every_event_kind_serializes_into_a_batch() {
    let schema = schema::trace::<Event>().unwrap();
    let fields: Vec<FieldRef> = schema.fields().iter().cloned().collect();
    let warning = Event::coverage_warning(&origin(), 5, 1, None, None, "w".into());
    let full = full_event(class::MODULE_ACTIVITY, 7, 2);
    let mut finding = full_event(class::DETECTION_FINDING, 9, 3);
    finding.evidences[0].data = serde_json::to_value(&warning).unwrap();
    let events = [warning, full, finding];
    let mut b = ArrayBuilder::from_arrow(&fields).unwrap();
    for ev in &events {
        let mut ev = ev.clone();
        for e in &mut ev.evidences {
            e.data = serde_json::Value::String(e.data.to_string());
        }
        b.push(&ev)
            .unwrap_or_else(|e| panic!("{}: {e}", ev.metadata.uid));
    }
    let batch = b.to_record_batch().unwrap();
    assert_eq!(batch.num_rows(), 3);
    // The nested JSON survives as text.
    let evidences = batch
        .column_by_name("evidences")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow_array::ListArray>()
        .unwrap();
    let data = evidences
        .value(2)
        .as_any()
        .downcast_ref::<arrow_array::StructArray>()
        .unwrap()
        .column_by_name("data")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow_array::StringArray>()
        .unwrap()
        .value(0)
        .to_owned();
    let back: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(back["metadata"]["event_code"], "coverage_warning");
    assert!(evidences.is_null(0), "a warning has no evidences");
}

/// Files land in the Security Lake tree, one source per class and one per
/// event day, private, time-ordered, zstd, with pages under 1 MB, and no
/// temporary file stays behind.
#[test]
fn files_follow_the_security_lake_layout_and_limits() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("lake");
    let mut w = writer(&dir, 64 << 20);
    let day1 = 1_764_000_000_000; // 2025-11-24
    let day2 = day1 + 86_400_000;
    // Out of order within a day, across two days and two classes.
    for (i, time) in [day1 + 500, day1 + 100, day2 + 5, day1 + 300]
        .iter()
        .enumerate()
    {
        w.add(full_event(class::MODULE_ACTIVITY, *time, i as u64));
    }
    w.add(full_event(class::FILE_SYSTEM_ACTIVITY, day1 + 1, 10));
    // Enough big rows for several pages.
    for i in 0..3000 {
        let mut ev = full_event(class::DETECTION_FINDING, day1 + 3000 - i, 100 + i as u64);
        ev.message = format!("{i:0>2000}");
        w.add(ev);
    }
    w.roll_due(true);
    let (files, other) = files_under(&dir);
    assert!(other.is_empty(), "left behind: {other:?}");
    let rel: Vec<String> = files
        .iter()
        .map(|p| {
            p.parent()
                .unwrap()
                .strip_prefix(&dir)
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        rel,
        [
            "ext/kw_detection_finding/region=eu-west-1/accountId=external/eventDay=20251124",
            "ext/kw_file_activity/region=eu-west-1/accountId=external/eventDay=20251124",
            "ext/kw_module_activity/region=eu-west-1/accountId=external/eventDay=20251124",
            "ext/kw_module_activity/region=eu-west-1/accountId=external/eventDay=20251125",
        ]
    );
    let mut total = 0;
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
        let mut times = Vec::new();
        for b in read_rows(f) {
            let col = b
                .column_by_name("time")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone();
            times.extend(col.values().iter().copied());
        }
        assert!(times.is_sorted(), "{}: {times:?}", f.display());
        let day = layout::event_day(times[0]);
        assert!(times.iter().all(|t| layout::event_day(*t) == day));
        total += times.len();
        // zstd, and every data page under 1 MB.
        let reader = SerializedFileReader::new(File::open(f).unwrap()).unwrap();
        for rg in 0..reader.num_row_groups() {
            let rg = reader.get_row_group(rg).unwrap();
            for c in 0..rg.num_columns() {
                assert_eq!(
                    rg.metadata().column(c).compression(),
                    Compression::ZSTD(Default::default())
                );
                for page in rg.get_column_page_reader(c).unwrap() {
                    let page = page.unwrap();
                    assert!(
                        page.buffer().len() <= 1_000_000,
                        "{}: a {} byte {:?} page in column {}",
                        f.display(),
                        page.buffer().len(),
                        page.page_type(),
                        rg.metadata().column(c).column_path(),
                    );
                }
            }
        }
    }
    assert_eq!(total, 3005);
    assert_eq!(w.stats.rows.load(Ordering::Relaxed), 3005);
    assert_eq!(w.stats.files.load(Ordering::Relaxed), 4);
    assert_eq!(w.stats.shed_write.load(Ordering::Relaxed), 0);
}

#[test]
fn files_roll_by_size() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("lake");
    let mut w = writer(&dir, 1 << 20);
    for i in 0..5000 {
        let mut ev = full_event(class::MODULE_ACTIVITY, 1_764_000_000_000 + i, i as u64);
        ev.message = "m".repeat(500);
        w.add(ev);
    }
    w.roll_due(true);
    let (files, _) = files_under(&dir);
    assert!(files.len() >= 2, "{files:?}");
    let rows: usize = files
        .iter()
        .flat_map(|f| read_rows(f))
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows, 5000);
}

/// A directory that cannot be written (here: someone planted a symlink
/// where the source's directory goes) sheds the file's events, counted.
#[test]
fn events_of_a_file_that_cannot_be_written_are_counted_as_shed() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("lake");
    let mut w = writer(&dir, 64 << 20);
    std::fs::create_dir_all(dir.join("ext")).unwrap();
    std::os::unix::fs::symlink(t.path(), dir.join("ext/kw_module_activity")).unwrap();
    for i in 0..7 {
        w.add(full_event(class::MODULE_ACTIVITY, 1_764_000_000_000, i));
    }
    w.add(full_event(
        class::FILE_SYSTEM_ACTIVITY,
        1_764_000_000_000,
        9,
    ));
    w.roll_due(true);
    assert_eq!(w.stats.shed_write.load(Ordering::Relaxed), 7);
    assert_eq!(w.stats.rows.load(Ordering::Relaxed), 1);
    assert_eq!(files_under(&dir).0.len(), 1);
}

/// What a sensor killed mid-close leaves: a complete temporary file is
/// finished (renamed), a cut-short one removed; other names are left.
#[test]
fn a_killed_sensors_temporary_files_are_finished_or_discarded() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("lake");
    let mut w = writer(&dir, 64 << 20);
    for i in 0..10 {
        w.add(full_event(
            class::MODULE_ACTIVITY,
            1_764_000_000_000 + i,
            i as u64,
        ));
    }
    w.roll_due(true);
    drop(w); // releases the lock, as the killed sensor's death does
    let (files, _) = files_under(&dir);
    let [done] = files.as_slice() else {
        panic!("{files:?}")
    };
    let part = done.parent().unwrap();
    let name = done.file_name().unwrap().to_str().unwrap().to_owned();
    // Killed between the last write and the rename: complete.
    let complete = part.join(files::temporary_name("keywarden-old-000001.parquet"));
    std::fs::copy(done, &complete).unwrap();
    // Killed mid-write: cut short.
    let bytes = std::fs::read(done).unwrap();
    let cut = part.join(files::temporary_name("keywarden-old-000002.parquet"));
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    // Not the sensor's: left alone.
    let foreign = part.join(".someone-else.tmp");
    std::fs::write(&foreign, b"x").unwrap();

    let root = Root::open(&dir).unwrap();
    let r = files::recover(&root);
    assert_eq!(
        r,
        files::Recovered {
            finished: 1,
            discarded: 1
        }
    );
    assert!(!complete.exists() && !cut.exists());
    assert!(foreign.exists());
    let finished = part.join("keywarden-old-000001.parquet");
    assert_eq!(
        read_rows(&finished)
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>(),
        10
    );
    assert!(part.join(&name).exists());
    // Nothing left to do the second time.
    assert_eq!(files::recover(&root), files::Recovered::default());
}

/// A writer that has fallen behind: the queue takes what it can hold,
/// and each event past that is shed and counted as `parquet_backlog`,
/// not waited for; once the writer is gone, as `parquet_write`. Nothing
/// goes uncounted.
#[test]
fn a_full_queue_sheds_and_counts_every_event_it_refuses() {
    const ROOM: usize = 16;
    let (tx, rx) = crossbeam_channel::bounded(ROOM);
    let mut sink = ParquetSink {
        tx: Some(tx),
        writer: None,
        stats: Arc::default(),
        dir: "test".into(),
        shed_backlog: 0,
    };
    let ev = full_event(class::MODULE_ACTIVITY, 1_764_000_000_000, 0);
    for _ in 0..ROOM + 5 {
        sink.push(&ev);
    }
    assert_eq!(rx.len(), ROOM, "the queue is filled to its bound");
    assert_eq!(sink.shed(), (5, 0));
    assert_eq!(sink.counts().queued, ROOM as u64);
    // The writer drains one: the next event fits again.
    rx.recv().unwrap();
    sink.push(&ev);
    assert_eq!(sink.shed(), (5, 0));
    // The writer is gone: what cannot be handed over is a write loss.
    drop(rx);
    sink.push(&ev);
    sink.push(&ev);
    assert_eq!(sink.shed(), (5, 2));
}
