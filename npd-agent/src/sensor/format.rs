//! Parses tracefs `format` files (`/sys/kernel/tracing/events/<group>/<name>/format`) and reads
//! fields out of raw tracepoint records with them. Field layouts differ between kernels
//! (`sched_process_hang.comm` became `__data_loc`, `mark_victim` gained fields in 2024,
//! `block_rq_error.rwbs` grew), so npd never hard-codes an offset.

use std::{fmt, path::Path};

use thiserror::Error;

/// A field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// The field's name (`pid`, `comm`, `common_pid`...).
    pub name: String,
    /// Offset from the start of the record.
    pub offset: usize,
    /// Size in bytes (for `__data_loc`, the 4-byte locator).
    pub size: usize,
    /// Whether an integer field is signed.
    pub signed: bool,
    /// What kind of field it is.
    pub kind: FieldKind,
}

/// The shape of a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// An integer of `size` bytes.
    Integer,
    /// A fixed `char name[N]` array holding a NUL-padded string.
    CharArray,
    /// `__data_loc char[] name`: a u32 locator, low 16 bits the data's offset from the record
    /// start, high 16 bits its length (with the terminating NUL).
    DataLoc,
}

/// The fields of one tracepoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracepointFormat {
    /// The tracepoint's name (`console`, `mark_victim`...).
    pub name: String,
    /// All fields, common ones included, in file order.
    pub fields: Vec<Field>,
}

/// A format file that could not be parsed.
#[derive(Debug, Error)]
pub enum FormatError {
    /// The file could not be read (a missing file means a missing tracepoint).
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A `field:` line did not have the expected shape.
    #[error("{path}: line {line}: cannot parse field description {text:?}")]
    BadField {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
}

/// A field could not be read from a record.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum FieldError {
    /// The tracepoint has no such field on this kernel.
    #[error("tracepoint {tracepoint} has no field {field}")]
    Missing {
        /// Tracepoint name.
        tracepoint: String,
        /// Field name.
        field: &'static str,
    },
    /// The field (or the data it points to) lies outside the bytes we have.
    #[error("field {field} at {offset}+{size} is outside the {have}-byte record")]
    OutOfRange {
        /// Field name.
        field: String,
        /// Offset of the data.
        offset: usize,
        /// Size of the data.
        size: usize,
        /// Bytes available.
        have: usize,
    },
    /// The field is not of a kind that can be read this way.
    #[error("field {field} is not {wanted}")]
    WrongKind {
        /// Field name.
        field: String,
        /// What was asked for.
        wanted: &'static str,
    },
}

impl TracepointFormat {
    /// Reads and parses a format file.
    pub fn read(path: &Path) -> Result<Self, FormatError> {
        let text = std::fs::read_to_string(path).map_err(|source| FormatError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the text of a format file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, FormatError> {
        let mut name = String::new();
        let mut fields = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(n) = line.strip_prefix("name:") {
                name = n.trim().to_string();
            } else if line.starts_with("field:") {
                let field = parse_field(line).ok_or_else(|| FormatError::BadField {
                    path: origin.to_string(),
                    line: i + 1,
                    text: line.to_string(),
                })?;
                fields.push(field);
            }
        }
        Ok(Self { name, fields })
    }

    /// The field called `name`, if this kernel has it.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The field called `name`, or an error naming the tracepoint and field.
    pub fn require(&self, name: &'static str) -> Result<&Field, FieldError> {
        self.field(name).ok_or_else(|| FieldError::Missing {
            tracepoint: self.name.clone(),
            field: name,
        })
    }
}

/// Parses `field:<decl>;\toffset:N;\tsize:N;\tsigned:N;`.
fn parse_field(line: &str) -> Option<Field> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    let mut signed = false;
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once(':')?;
        match key.trim() {
            "field" => decl = Some(value.trim()),
            "offset" => offset = value.trim().parse().ok(),
            "size" => size = value.trim().parse().ok(),
            "signed" => signed = value.trim() == "1",
            _ => {}
        }
    }
    let decl = decl?;
    let data_loc = decl.starts_with("__data_loc");
    // The name is the last word, minus any array suffix: `char rwbs[10]`, `char[] msg`.
    let last = decl.split_whitespace().last()?;
    let (name, is_array) = match last.find('[') {
        Some(i) => (&last[..i], true),
        None => (last, false),
    };
    if name.is_empty() {
        return None;
    }
    let kind = if data_loc {
        FieldKind::DataLoc
    } else if is_array && decl.starts_with("char") {
        FieldKind::CharArray
    } else {
        FieldKind::Integer
    };
    Some(Field {
        name: name.to_string(),
        offset: offset?,
        size: size?,
        signed,
        kind,
    })
}

fn slice<'a>(
    record: &'a [u8],
    field: &str,
    offset: usize,
    size: usize,
) -> Result<&'a [u8], FieldError> {
    offset
        .checked_add(size)
        .and_then(|end| record.get(offset..end))
        .ok_or_else(|| FieldError::OutOfRange {
            field: field.to_string(),
            offset,
            size,
            have: record.len(),
        })
}

impl Field {
    /// Reads an integer field as i64 (sign- or zero-extended per the format; records are in
    /// the host's byte order).
    pub fn read_i64(&self, record: &[u8]) -> Result<i64, FieldError> {
        if self.kind != FieldKind::Integer || !matches!(self.size, 1 | 2 | 4 | 8) {
            return Err(FieldError::WrongKind {
                field: self.name.clone(),
                wanted: "an integer of 1, 2, 4 or 8 bytes",
            });
        }
        let b = slice(record, &self.name, self.offset, self.size)?;
        let mut buf = [0u8; 8];
        buf[..b.len()].copy_from_slice(b);
        let raw = u64::from_ne_bytes(buf);
        let bits = self.size as u32 * 8;
        Ok(if self.signed && bits < 64 {
            let shift = 64 - bits;
            ((raw << shift) as i64) >> shift
        } else {
            raw as i64
        })
    }

    /// Reads an integer field as u64 (the bit pattern, zero-extended).
    pub fn read_u64(&self, record: &[u8]) -> Result<u64, FieldError> {
        let v = self.read_i64(record)?;
        let bits = self.size as u32 * 8;
        Ok(if bits < 64 {
            (v as u64) & ((1u64 << bits) - 1)
        } else {
            v as u64
        })
    }

    /// Reads a string field (`char name[N]` or `__data_loc char[] name`) up to its first NUL.
    pub fn read_bytes<'a>(&self, record: &'a [u8]) -> Result<&'a [u8], FieldError> {
        let data = match self.kind {
            FieldKind::CharArray => slice(record, &self.name, self.offset, self.size)?,
            FieldKind::DataLoc => {
                let loc = slice(record, &self.name, self.offset, 4)?;
                let loc = u32::from_ne_bytes([loc[0], loc[1], loc[2], loc[3]]);
                slice(
                    record,
                    &self.name,
                    (loc & 0xffff) as usize,
                    (loc >> 16) as usize,
                )?
            }
            FieldKind::Integer => {
                return Err(FieldError::WrongKind {
                    field: self.name.clone(),
                    wanted: "a string",
                });
            }
        };
        Ok(data.split(|&b| b == 0).next().unwrap_or_default())
    }

    /// Reads a string field, replacing bytes that are not UTF-8.
    pub fn read_string(&self, record: &[u8]) -> Result<String, FieldError> {
        Ok(super::kernel_text(self.read_bytes(record)?))
    }
}

impl fmt::Display for TracepointFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.name)?;
        for (i, field) in self
            .fields
            .iter()
            .filter(|f| !f.name.starts_with("common_"))
            .enumerate()
        {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{}@{}", field.name, field.offset)?;
        }
        write!(f, ")")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The format files of real kernels, kept in the repository (`npd-agent/testdata/formats`).
    pub(crate) fn kernel_format(kernel: &str, file: &str) -> TracepointFormat {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/formats")
            .join(kernel)
            .join(file);
        TracepointFormat::read(&path).unwrap()
    }

    pub(crate) const KERNELS: [&str; 5] = [
        "5.10.0-32-cloud-amd64",
        "6.1.0-50-cloud-amd64",
        "6.12.107+deb13-cloud-amd64",
        "6.18.44",
        "7.2.13+deb14-cloud-amd64",
    ];

    #[test]
    fn parses_every_known_kernel() {
        for kernel in KERNELS {
            let console = kernel_format(kernel, "printk_console.format");
            let msg = console.field("msg").unwrap();
            assert_eq!((msg.kind, msg.offset), (FieldKind::DataLoc, 8), "{kernel}");
            let hang = kernel_format(kernel, "sched_sched_process_hang.format");
            assert!(hang.field("pid").is_some(), "{kernel}");
            assert!(hang.field("comm").is_some(), "{kernel}");
            let oom = kernel_format(kernel, "oom_mark_victim.format");
            assert_eq!(oom.field("pid").unwrap().kind, FieldKind::Integer);
            let complete = kernel_format(kernel, "block_block_rq_complete.format");
            assert!(complete.field("error").is_some(), "{kernel}");
        }
    }

    #[test]
    fn layouts_differ_between_kernels() {
        let old = kernel_format("5.10.0-32-cloud-amd64", "sched_sched_process_hang.format");
        let new = kernel_format("6.18.44", "sched_sched_process_hang.format");
        assert_eq!(old.field("comm").unwrap().kind, FieldKind::CharArray);
        assert_eq!(old.field("comm").unwrap().size, 16);
        assert_eq!(new.field("comm").unwrap().kind, FieldKind::DataLoc);
        assert!(
            kernel_format("5.10.0-32-cloud-amd64", "oom_mark_victim.format")
                .field("comm")
                .is_none()
        );
        let rwbs = kernel_format("6.18.44", "block_block_rq_error.format");
        assert_eq!(rwbs.field("rwbs").unwrap().size, 10);
    }

    #[test]
    fn integers_sign_extend_per_format() {
        let f = Field {
            name: "x".into(),
            offset: 1,
            size: 2,
            signed: true,
            kind: FieldKind::Integer,
        };
        let rec = [0u8, 0xfe, 0xff, 0];
        assert_eq!(f.read_i64(&rec).unwrap(), -2);
        assert_eq!(f.read_u64(&rec).unwrap(), 0xfffe);
        let u = Field {
            signed: false,
            ..f.clone()
        };
        assert_eq!(u.read_i64(&rec).unwrap(), 0xfffe);
        assert!(matches!(
            f.read_i64(&rec[..2]),
            Err(FieldError::OutOfRange { .. })
        ));
    }

    #[test]
    fn data_loc_out_of_range_is_an_error_not_a_panic() {
        let f = Field {
            name: "comm".into(),
            offset: 0,
            size: 4,
            signed: false,
            kind: FieldKind::DataLoc,
        };
        let loc: u32 = (16 << 16) | 200;
        let mut rec = loc.to_ne_bytes().to_vec();
        rec.resize(64, b'a');
        assert!(matches!(
            f.read_bytes(&rec),
            Err(FieldError::OutOfRange { .. })
        ));
    }

    #[test]
    fn bad_field_line_names_file_and_line() {
        let err =
            TracepointFormat::parse("name: x\nformat:\n\tfield:int;\toffset:x;", "some/format")
                .unwrap_err();
        assert!(err.to_string().contains("some/format: line 3"), "{err}");
    }
}
