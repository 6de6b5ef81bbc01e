//! The first half of an import: the upload, read while it streams, split into stored chunks.
//!
//! A blocking task reads the file (through the character-set decoder when one is named),
//! checks the header, and cuts the rows into chunks of [`CHUNK_ROWS`], each with the line
//! every row starts on; the async side stores each chunk as it comes, in one transaction with
//! the import's row. Memory holds a couple of chunks whatever the file's size: a row longer
//! than [`MAX_ROW_BYTES`] (an unclosed quote, a binary file) stops the upload instead of
//! growing a buffer, and so does a file over the operator's `import_max_bytes`.

use std::io::{BufRead, BufReader, Read};

use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{
    CHUNK_ROWS, Column, Field, ImportFormat, ImportOptions, ImportStatus, MAX_ROW_BYTES, PARTS,
    guess_delimiter, part_of, resolve_columns, store,
};
use crate::domain::{TenantContext, TenantId};
use crate::validate::FieldError;

/// Why an upload was refused; nothing of it is kept.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The file cannot be imported as it is (a bad header, not UTF-8, a row too long).
    #[error("{0:?}")]
    Invalid(Vec<FieldError>),
    /// Over the operator's limit.
    #[error("the file is larger than the {0} bytes an import may be")]
    TooLarge(u64),
    /// The upload broke off or could not be read.
    #[error("the upload could not be read: {0}")]
    Body(String),
    /// An upload with the same `Idempotency-Key` is still coming in.
    #[error("an upload with this Idempotency-Key is still in progress")]
    InProgress,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl ReceiveError {
    fn invalid(field: &str, message: impl Into<String>) -> ReceiveError {
        ReceiveError::Invalid(vec![FieldError::new(field, message)])
    }
}

/// One stored chunk: rows of one part and the line each starts on.
#[derive(Debug, Default)]
pub struct Chunk {
    pub part: i16,
    pub lines: Vec<i64>,
    /// CSV records or NDJSON lines as the file has them (UTF-8), each ending in a newline.
    pub body: Vec<u8>,
}

/// What the reading side found.
struct Split {
    columns: Option<Vec<Option<Column>>>,
    delimiter: Option<u8>,
    rows: u64,
}

/// The marker inside `io::Error` for [`Capped`]'s limit.
#[derive(Debug)]
struct FileLimit(u64);

impl std::fmt::Display for FileLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the file is larger than {} bytes", self.0)
    }
}

impl std::error::Error for FileLimit {}

/// A reader that fails past `left` bytes.
struct Capped<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left + 1).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            return Err(std::io::Error::other(FileLimit(self.limit)));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn io_error(e: std::io::Error, max_bytes: u64) -> ReceiveError {
    if e.get_ref()
        .and_then(|inner| inner.downcast_ref::<FileLimit>())
        .is_some()
    {
        ReceiveError::TooLarge(max_bytes)
    } else {
        ReceiveError::Body(e.to_string())
    }
}

fn not_utf8(line: u64, charset_given: bool) -> ReceiveError {
    let hint = if charset_given {
        ""
    } else {
        "; if the file comes from Excel or an older system, name its character set with \
         `charset` (windows-1250, iso-8859-2)"
    };
    ReceiveError::invalid("charset", format!("line {line} is not valid UTF-8{hint}"))
}

/// Where a CSV record stands at the end of a line: whether a quoted field is still open.
/// Quotes follow RFC 4180 as the `csv` crate reads them: a field that starts with `"` is
/// quoted up to a `"` that is not doubled; a `"` inside an unquoted field is a character.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Quote {
    FieldStart,
    Unquoted,
    Quoted,
    /// A `"` inside a quoted field: a closing quote, or the first of a doubled one.
    ClosingOrDoubled,
}

impl Quote {
    fn scan(mut self, line: &[u8], delimiter: u8) -> Quote {
        for b in line {
            self = match (self, *b) {
                (Quote::FieldStart, b'"') => Quote::Quoted,
                (Quote::Quoted, b'"') => Quote::ClosingOrDoubled,
                (Quote::Quoted, _) => Quote::Quoted,
                (Quote::ClosingOrDoubled, b'"') => Quote::Quoted,
                (_, b) if b == delimiter => Quote::FieldStart,
                (_, b'\n') => Quote::FieldStart,
                _ => Quote::Unquoted,
            };
        }
        self
    }
}

/// Field `n` of a CSV record (UTF-8), unquoted, as the `csv` crate reads it.
fn nth_field(record: &[u8], delimiter: u8, n: usize) -> String {
    let mut field = 0;
    let mut out = Vec::new();
    let mut quote = Quote::FieldStart;
    for b in record {
        let next = quote.scan(std::slice::from_ref(b), delimiter);
        let keep = match (quote, next) {
            (_, Quote::FieldStart) if *b == delimiter => {
                field += 1;
                false
            }
            (Quote::FieldStart, Quote::Quoted) | (Quote::Quoted, Quote::ClosingOrDoubled) => false,
            _ => true,
        };
        if keep && field == n {
            out.push(*b);
        }
        quote = next;
        if field > n {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `external_id` of an NDJSON line, or nothing (its errors are found when it is written).
fn ndjson_external_id(line: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Id<'a> {
        #[serde(borrow, default)]
        external_id: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Id<'_>>(line)
        .ok()
        .and_then(|id| id.external_id)
        .map(|x| x.into_owned())
        .unwrap_or_default()
}

/// Reads the whole file, handing chunks to `out`; blocking. Rows are cut line by line, so
/// every row keeps the line it starts on (a quoted field may span lines; blank lines are
/// skipped and counted).
fn split(
    reader: impl Read,
    opts: &ImportOptions,
    max_bytes: u64,
    out: &mpsc::Sender<Chunk>,
) -> Result<Split, ReceiveError> {
    let capped = Capped {
        inner: reader,
        left: max_bytes,
        limit: max_bytes,
    };
    let decoded: Box<dyn Read> = match opts.encoding {
        Some(enc) if enc != encoding_rs::UTF_8 => Box::new(
            encoding_rs_io::DecodeReaderBytesBuilder::new()
                .encoding(Some(enc))
                .build(capped),
        ),
        _ => Box::new(capped),
    };
    let mut input = BufReader::with_capacity(64 << 10, decoded);
    let send = |chunk: Chunk| {
        out.blocking_send(chunk)
            .map_err(|_| ReceiveError::Body("the upload was abandoned".to_owned()))
    };
    let csv = opts.format == ImportFormat::Csv;
    let mut delimiter = opts.delimiter;
    let mut columns: Option<Vec<Option<Column>>> = None;
    let mut id_column = 0;
    let mut parts: Vec<Chunk> = (0..PARTS)
        .map(|p| Chunk {
            part: p as i16,
            ..Chunk::default()
        })
        .collect();
    let mut record: Vec<u8> = Vec::new();
    let mut quote = Quote::FieldStart;
    let (mut number, mut start, mut rows) = (0u64, 0u64, 0u64);
    loop {
        let room = (MAX_ROW_BYTES + 1).saturating_sub(record.len()) as u64;
        let n = (&mut input)
            .take(room)
            .read_until(b'\n', &mut record)
            .map_err(|e| io_error(e, max_bytes))?;
        if n == 0 {
            if record.is_empty() {
                break;
            }
        } else {
            let line_start = record.len() - n;
            number += 1;
            if line_start == 0 {
                start = number;
            }
            if record.len() > MAX_ROW_BYTES {
                let hint = if quote == Quote::Quoted {
                    " (a quote never closed?)"
                } else {
                    ""
                };
                return Err(ReceiveError::invalid(
                    "row",
                    format!(
                        "the row starting on line {start} is longer than {MAX_ROW_BYTES} bytes{hint}"
                    ),
                ));
            }
            if let Some(d) = delimiter.filter(|_| csv) {
                quote = quote.scan(&record[line_start..], d);
                if quote == Quote::Quoted && record.ends_with(b"\n") {
                    // A quoted field goes on over the next line.
                    continue;
                }
            }
        }
        if start == 1 && record.starts_with("\u{feff}".as_bytes()) {
            record.drain(..3);
        }
        if csv && quote == Quote::Quoted {
            return Err(ReceiveError::invalid(
                "row",
                format!("the quote opened in the row on line {start} is never closed"),
            ));
        }
        quote = Quote::FieldStart;
        let text = record.strip_suffix(b"\n").unwrap_or(&record);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if std::str::from_utf8(text).is_err() {
            return Err(not_utf8(start, opts.encoding.is_some()));
        }
        if csv && columns.is_none() {
            if text.iter().all(u8::is_ascii_whitespace) {
                return Err(ReceiveError::invalid(
                    "header",
                    "the file starts with an empty line; a CSV import starts with a header row",
                ));
            }
            let d = *delimiter.get_or_insert_with(|| guess_delimiter(text));
            let names: Vec<String> = csv::ReaderBuilder::new()
                .delimiter(d)
                .has_headers(false)
                .from_reader(text)
                .records()
                .next()
                .transpose()
                .map_err(|e| ReceiveError::invalid("header", e.to_string()))?
                .map(|r| r.iter().map(str::to_owned).collect())
                .unwrap_or_default();
            let resolved = resolve_columns(&names, &opts.mapping).map_err(ReceiveError::Invalid)?;
            id_column = resolved
                .iter()
                .position(|c| *c == Some(Column::Field(Field::ExternalId)))
                .unwrap_or(0);
            columns = Some(resolved);
        } else if !text.iter().all(u8::is_ascii_whitespace) {
            let part = match delimiter.filter(|_| csv) {
                Some(d) => part_of(nth_field(text, d, id_column).trim().as_bytes()),
                None => part_of(ndjson_external_id(text).trim().as_bytes()),
            };
            let chunk = &mut parts[part];
            chunk.lines.push(start as i64);
            chunk.body.extend_from_slice(text);
            chunk.body.push(b'\n');
            rows += 1;
            if chunk.lines.len() == CHUNK_ROWS {
                let full = std::mem::replace(
                    chunk,
                    Chunk {
                        part: part as i16,
                        ..Chunk::default()
                    },
                );
                send(full)?;
            }
        }
        record.clear();
        if n == 0 {
            break;
        }
    }
    if csv && columns.is_none() {
        return Err(ReceiveError::invalid(
            "header",
            "the file is empty; a CSV import starts with a header row",
        ));
    }
    for chunk in parts {
        if !chunk.lines.is_empty() {
            send(chunk)?;
        }
    }
    Ok(Split {
        columns,
        delimiter,
        rows,
    })
}

/// Reads `reader` into a new import of `tenant` and queues it for the workers; the import's
/// id. The chunks are stored as they come (no transaction or connection is held while the
/// client sends), under an import that stays `receiving`, which no worker touches, until the
/// whole file is in: an upload that fails is deleted at once (also when the client goes
/// away: the request's future is dropped), and one whose process died is deleted by the
/// workers once `deadline_secs` have passed. An `Idempotency-Key` seen before answers with
/// that import (`Ok(Err(id))`) without reading the file.
pub async fn receive<R: Read + Send + 'static>(
    pool: &PgPool,
    tenant: &TenantContext,
    opts: ImportOptions,
    reader: R,
    max_bytes: u64,
    deadline_secs: u64,
) -> Result<Result<Uuid, Uuid>, ReceiveError> {
    if let Some(key) = &opts.idempotency_key {
        if let Some(existing) = by_key(pool, tenant, key).await? {
            return existing;
        }
    }
    let id = Uuid::now_v7();
    let inserted = store::insert_receiving(pool, tenant.id, id, &opts, deadline_secs).await;
    if let Err(e) = inserted {
        // The same key from a concurrent request.
        if let (Some(key), Some(db)) = (&opts.idempotency_key, e.as_database_error()) {
            if db.is_unique_violation() {
                if let Some(existing) = by_key(pool, tenant, key).await? {
                    return existing;
                }
            }
        }
        return Err(e.into());
    }
    let mut cleanup = Cleanup {
        pool: pool.clone(),
        tenant: tenant.id,
        id,
        armed: true,
    };
    let stored = async {
        let (chunks, mut incoming) = mpsc::channel::<Chunk>(2);
        let parse_opts = opts.clone();
        let parser =
            tokio::task::spawn_blocking(move || split(reader, &parse_opts, max_bytes, &chunks));
        let mut seqs = [0i32; PARTS];
        while let Some(chunk) = incoming.recv().await {
            let seq = &mut seqs[chunk.part as usize % PARTS];
            store::insert_chunk(pool, tenant.id, id, *seq, &chunk).await?;
            *seq += 1;
        }
        parser
            .await
            .map_err(|e| ReceiveError::Body(format!("the reader stopped: {e}")))?
    }
    .await;
    let found = match stored {
        Ok(found) => found,
        Err(e) => {
            cleanup.armed = false;
            if let Err(d) = store::delete_unfinished(pool, tenant.id, id).await {
                tracing::warn!(tenant = %tenant.id, import = %id, error = %d, "a refused upload stays until the workers sweep it");
            }
            return Err(e);
        }
    };
    let columns = found.columns.map(|cols| {
        serde_json::Value::Array(
            cols.iter()
                .map(|c| {
                    c.as_ref()
                        .map_or(serde_json::Value::Null, |c| c.name().into())
                })
                .collect(),
        )
    });
    let rows = i64::try_from(found.rows).unwrap_or(i64::MAX);
    let delimiter = found.delimiter.map(|d| char::from(d).to_string());
    store::finish_receiving(pool, tenant.id, id, columns, rows, delimiter).await?;
    cleanup.armed = false;
    metrics::counter!("contact_import_rows_received_total").increment(found.rows);
    Ok(Ok(id))
}

/// Deletes an import whose upload did not finish, however `receive` ended (an error, or its
/// future dropped when the client went away).
struct Cleanup {
    pool: PgPool,
    tenant: TenantId,
    id: Uuid,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (pool, tenant, id) = (self.pool.clone(), self.tenant, self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = store::delete_unfinished(&pool, tenant, id).await {
                    tracing::warn!(%tenant, import = %id, error = %e, "an abandoned upload stays until the workers sweep it");
                }
            });
        }
    }
}

/// The answer for an `Idempotency-Key` already used: its import, or 409 while its upload is
/// still coming in.
async fn by_key(
    pool: &PgPool,
    tenant: &TenantContext,
    key: &str,
) -> Result<Option<Result<Result<Uuid, Uuid>, ReceiveError>>, sqlx::Error> {
    let found = store::by_key(pool, tenant.id, key).await?;
    Ok(found.map(|(id, status)| {
        if status == ImportStatus::Receiving {
            Err(ReceiveError::InProgress)
        } else {
            Ok(Err(id))
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contacts::import::{ImportMode, ImportOptions};

    fn opts(format: ImportFormat) -> ImportOptions {
        ImportOptions {
            format,
            mode: ImportMode::Upsert,
            dry_run: false,
            filename: None,
            mapping: Default::default(),
            delimiter: None,
            encoding: None,
            idempotency_key: None,
        }
    }

    fn run(data: &[u8], opts: &ImportOptions, max: u64) -> (Result<u64, String>, Vec<Chunk>) {
        let (tx, mut rx) = mpsc::channel(10_000);
        let result = split(std::io::Cursor::new(data.to_vec()), opts, max, &tx)
            .map(|s| s.rows)
            .map_err(|e| e.to_string());
        drop(tx);
        let mut chunks = Vec::new();
        while let Ok(c) = rx.try_recv() {
            chunks.push(c);
        }
        (result, chunks)
    }

    /// Every row of the chunks, (line, text), in line order.
    fn rows_of(chunks: &[Chunk]) -> Vec<(i64, String)> {
        let mut rows = Vec::new();
        for c in chunks {
            // Each record here is one line of text unless it holds a quoted newline; the
            // tests below read multi-line records through `csv`.
            let text = String::from_utf8_lossy(&c.body).into_owned();
            for (line, record) in c.lines.iter().zip(split_records(&text)) {
                rows.push((*line, record));
            }
        }
        rows.sort();
        rows
    }

    /// The records of a chunk body, by the same quote rules as the reader.
    fn split_records(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut current = String::new();
        let mut quote = Quote::FieldStart;
        for line in text.split_inclusive('\n') {
            current.push_str(line);
            quote = quote.scan(line.as_bytes(), b';');
            if quote != Quote::Quoted {
                out.push(std::mem::take(&mut current).trim_end().to_owned());
                quote = Quote::FieldStart;
            }
        }
        out
    }

    #[test]
    fn csv_rows_keep_their_line_numbers_across_quoted_newlines() {
        let data = "\u{feff}external_id;first_name\nc1;\"Ana\nMarija\"\n\nc2;Iva\n";
        let (rows, chunks) = run(data.as_bytes(), &opts(ImportFormat::Csv), 1 << 20);
        assert_eq!(rows, Ok(2));
        assert_eq!(
            rows_of(&chunks),
            vec![
                (2, "c1;\"Ana\nMarija\"".to_owned()),
                (5, "c2;Iva".to_owned())
            ]
        );
    }

    #[test]
    fn quotes_inside_fields_do_not_join_lines() {
        let data = "external_id,last_name,attributes.note\r\nc1,O\"Brien,\"said \"\"hi\"\"\"\r\nc2,Kovač,\"a,\r\nb\"\r\n";
        let (rows, chunks) = run(data.as_bytes(), &opts(ImportFormat::Csv), 1 << 20);
        assert_eq!(rows, Ok(2));
        let lines: Vec<i64> = rows_of(&chunks).into_iter().map(|(l, _)| l).collect();
        assert_eq!(lines, vec![2, 3]);
        let (rows, _) = run(
            b"external_id,attributes.note\nc1,\"open\nc2,x\n",
            &opts(ImportFormat::Csv),
            1 << 20,
        );
        assert!(rows.unwrap_err().contains("line 2 is never closed"));
    }

    #[test]
    fn rows_are_cut_into_chunks_by_part_and_one_contact_stays_in_one() {
        let mut data = String::from("external_id,first_name\n");
        for n in 0..5000 {
            data.push_str(&format!("c{n},x\n"));
            if n % 1000 == 0 {
                data.push_str(&format!("\"dup\",v{n}\n"));
            }
        }
        let (rows, chunks) = run(data.as_bytes(), &opts(ImportFormat::Csv), 1 << 20);
        assert_eq!(rows, Ok(5005));
        assert!(chunks.iter().all(|c| c.lines.len() <= CHUNK_ROWS));
        let total: usize = chunks.iter().map(|c| c.lines.len()).sum();
        assert_eq!(total, 5005);
        let parts: std::collections::BTreeSet<i16> = chunks.iter().map(|c| c.part).collect();
        assert_eq!(parts.len(), PARTS, "the rows spread over every part");
        // Every "dup" row is in one part, in file order.
        let dups: Vec<(i16, i64)> = chunks
            .iter()
            .flat_map(|c| {
                let text = String::from_utf8_lossy(&c.body).into_owned();
                c.lines
                    .iter()
                    .zip(text.lines().map(str::to_owned).collect::<Vec<_>>())
                    .filter(|(_, t)| t.starts_with("\"dup\""))
                    .map(|(l, _)| (c.part, *l))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(dups.len(), 5);
        assert!(dups.iter().all(|(p, _)| *p == dups[0].0));
        assert!(dups.windows(2).all(|w| w[0].1 < w[1].1));
        assert_eq!(nth_field(b"a,\"b,\"\"c\"\"\",d", b',', 1), "b,\"c\"");
        assert_eq!(nth_field(b"a,\"b,\"\"c\"\"\",d", b',', 2), "d");
        assert_eq!(nth_field(b"x;O\"Brien", b';', 1), "O\"Brien");
        assert_eq!(
            ndjson_external_id(br#"{"email":"a","external_id":"k\u00e9"}"#),
            "k\u{e9}"
        );
    }

    #[test]
    fn limits_stop_the_upload() {
        let data = format!("external_id\n\"{}", "x".repeat(3 << 20));
        let (rows, _) = run(data.as_bytes(), &opts(ImportFormat::Csv), 10 << 20);
        assert!(rows.unwrap_err().contains("line 2"));
        let (rows, _) = run(b"external_id\nc1\nc2\n", &opts(ImportFormat::Csv), 10);
        assert!(rows.unwrap_err().contains("larger than"));
        let (rows, _) = run(b"external_id\nc\xe8\n", &opts(ImportFormat::Csv), 100);
        assert!(rows.unwrap_err().contains("windows-1250"));
    }

    #[test]
    fn a_windows_1250_file_is_read_as_such() {
        let (bytes, _, _) = encoding_rs::WINDOWS_1250.encode("external_id,last_name\nc1,Šimić\n");
        let mut o = opts(ImportFormat::Csv);
        o.encoding = Some(encoding_rs::WINDOWS_1250);
        let (rows, chunks) = run(&bytes, &o, 1 << 20);
        assert_eq!(rows, Ok(1));
        assert_eq!(String::from_utf8_lossy(&chunks[0].body), "c1,Šimić\n");
    }

    #[test]
    fn ndjson_skips_blank_lines_and_counts_them() {
        let data = b"{\"external_id\":\"a\"}\r\n\n{\"external_id\":\"b\"}";
        let (rows, chunks) = run(data, &opts(ImportFormat::Ndjson), 1 << 20);
        assert_eq!(rows, Ok(2));
        assert_eq!(
            rows_of(&chunks),
            vec![
                (1, "{\"external_id\":\"a\"}".to_owned()),
                (3, "{\"external_id\":\"b\"}".to_owned())
            ]
        );
    }
}
