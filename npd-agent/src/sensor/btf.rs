//! The little of the kernel's BTF (`/sys/kernel/btf/vmlinux`) that the eBPF programs need:
//! offsets of struct members, an enum's value, and the argument types of a raw tracepoint.
//!
//! The programs take them as load-time constants (`npd_common::ProgramConfig`), as they take
//! tracepoint field offsets from the `format` files, so one object runs on every kernel without
//! CO-RE relocations. Only the type section is read, and every read is bounds-checked: a
//! missing or malformed BTF gives `None` (that program is then not attached), never a panic.
//!
//! The format: a header, a type section (one `struct btf_type` of 12 bytes per type, followed by
//! kind-specific data), and a string section. Type ids start at 1 (0 is `void`). See the
//! kernel's `Documentation/bpf/btf.rst`.

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// How deep anonymous structs and unions are searched for a member.
const MAX_NESTING: usize = 8;

/// One type: its kind, name, the `size_or_type` word, and where its kind-specific data is.
#[derive(Clone, Copy, Debug)]
struct Type {
    kind: u8,
    kind_flag: bool,
    vlen: u16,
    name_off: u32,
    size_or_type: u32,
    /// Where the kind-specific data starts, in the type section.
    extra: u32,
}

/// A parsed BTF blob. The running kernel's is a few MiB with over 100,000 types: it is read
/// into one buffer and indexed by one vector (both freed whole when dropped, so the agent's
/// resident memory does not keep them), and names are looked up by scanning, which the few
/// lookups npd makes at start afford.
pub struct Btf {
    data: Vec<u8>,
    types_at: usize,
    types_len: usize,
    strings_at: usize,
    strings_len: usize,
    types: Vec<Type>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

impl Btf {
    /// The running kernel's BTF, when it has one.
    pub fn vmlinux() -> Option<Btf> {
        Btf::parse(std::fs::read("/sys/kernel/btf/vmlinux").ok()?)
    }

    /// Parses a little-endian BTF blob; `None` when it is not one.
    pub fn parse(data: Vec<u8>) -> Option<Btf> {
        if u16_at(&data, 0)? != MAGIC {
            return None;
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let section = |off: usize, len: usize| -> Option<(usize, usize)> {
            let start = hdr_len.checked_add(u32_at(&data, off)? as usize)?;
            let len = u32_at(&data, len)? as usize;
            (start.checked_add(len)? <= data.len()).then_some((start, len))
        };
        let (types_at, types_len) = section(8, 12)?;
        let (strings_at, strings_len) = section(16, 20)?;
        let mut btf = Btf {
            data,
            types_at,
            types_len,
            strings_at,
            strings_len,
            // At most one type per 12 bytes: one allocation, never grown, which the allocator
            // maps on its own and unmaps on drop.
            types: Vec::with_capacity(types_len / 12),
        };
        let mut at = 0;
        while at < types_len {
            let section = btf.type_section();
            let name_off = u32_at(section, at)?;
            let info = u32_at(section, at + 4)?;
            let size_or_type = u32_at(section, at + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra_len = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                _ => return None,
            };
            let extra = at + 12;
            at = extra.checked_add(extra_len)?;
            if at > types_len {
                return None;
            }
            btf.types.push(Type {
                kind: kind as u8,
                kind_flag: info >> 31 == 1,
                vlen: vlen as u16,
                name_off,
                size_or_type,
                extra: u32::try_from(extra).ok()?,
            });
        }
        Some(btf)
    }

    fn type_section(&self) -> &[u8] {
        &self.data[self.types_at..self.types_at + self.types_len]
    }

    fn word(&self, at: usize) -> Option<u32> {
        u32_at(self.type_section(), at)
    }

    fn name(&self, off: u32) -> Option<&[u8]> {
        let strings = &self.data[self.strings_at..self.strings_at + self.strings_len];
        let rest = strings.get(off as usize..)?;
        Some(&rest[..rest.iter().position(|&b| b == 0)?])
    }

    fn named(&self, ty: &Type, name: &str) -> bool {
        ty.name_off != 0 && self.name(ty.name_off) == Some(name.as_bytes())
    }

    /// The first type of `kind` called `name`.
    fn find(&self, kind: u32, name: &str) -> Option<(u32, &Type)> {
        self.types
            .iter()
            .enumerate()
            .find(|(_, ty)| u32::from(ty.kind) == kind && self.named(ty, name))
            .map(|(i, ty)| (i as u32 + 1, ty))
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let ty = self.get(id)?;
            match u32::from(ty.kind) {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type;
                }
                _ => return Some(ty),
            }
        }
        None
    }

    /// The byte offset of `member` in `struct name` (searched through anonymous structs and
    /// unions, as C sees it). `None` for a bit field not on a byte boundary.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let (_, ty) = self.find(KIND_STRUCT, name)?;
        let bits = self.member_bits(ty, member, 0)?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    fn member_bits(&self, ty: &Type, member: &str, depth: usize) -> Option<u32> {
        if !matches!(u32::from(ty.kind), KIND_STRUCT | KIND_UNION) || depth > MAX_NESTING {
            return None;
        }
        for i in 0..usize::from(ty.vlen) {
            let at = ty.extra as usize + i * 12;
            let (name_off, member_type, offset) =
                (self.word(at)?, self.word(at + 4)?, self.word(at + 8)?);
            // With kind_flag, the top 8 bits are a bit field's size.
            let bits = if ty.kind_flag {
                offset & 0x00ff_ffff
            } else {
                offset
            };
            if name_off == 0 {
                let inner = self
                    .resolve(member_type)
                    .and_then(|inner| self.member_bits(inner, member, depth + 1));
                if let Some(inner) = inner {
                    return bits.checked_add(inner);
                }
            } else if self.name(name_off) == Some(member.as_bytes()) {
                return Some(bits);
            }
        }
        None
    }

    /// The value of `name` in `enum enum_name`.
    pub fn enum_value(&self, enum_name: &str, name: &str) -> Option<i64> {
        let (_, ty) = self.find(KIND_ENUM, enum_name)?;
        (0..usize::from(ty.vlen)).find_map(|i| {
            let at = ty.extra as usize + i * 8;
            if self.name(self.word(at)?)? != name.as_bytes() {
                return None;
            }
            // ENUM values are signed 32-bit unless the kind flag says unsigned.
            let value = self.word(at + 4)?;
            Some(if ty.kind_flag {
                i64::from(value)
            } else {
                i64::from(value as i32)
            })
        })
    }

    /// Whether argument `n` of raw tracepoint `tracepoint` (its `TP_PROTO`, as the kernel's
    /// `btf_trace_<tracepoint>` typedef declares it) is a pointer to `struct struct_name`.
    pub fn raw_tracepoint_arg_is(&self, tracepoint: &str, n: usize, struct_name: &str) -> bool {
        self.raw_tracepoint_arg(tracepoint, n)
            .and_then(|id| self.resolve(id))
            .filter(|ty| u32::from(ty.kind) == KIND_PTR)
            .and_then(|ty| self.resolve(ty.size_or_type))
            .is_some_and(|ty| u32::from(ty.kind) == KIND_STRUCT && self.named(ty, struct_name))
    }

    /// The type of argument `n` of the tracepoint's prototype. The typedef's function takes
    /// the probe's `void *data` first, then the tracepoint's arguments.
    fn raw_tracepoint_arg(&self, tracepoint: &str, n: usize) -> Option<u32> {
        let (_, typedef) = self.find(KIND_TYPEDEF, &format!("btf_trace_{tracepoint}"))?;
        let ptr = self.resolve(typedef.size_or_type)?;
        if u32::from(ptr.kind) != KIND_PTR {
            return None;
        }
        let proto = self.resolve(ptr.size_or_type)?;
        if u32::from(proto.kind) != KIND_FUNC_PROTO || n + 1 >= usize::from(proto.vlen) {
            return None;
        }
        self.word(proto.extra as usize + (n + 1) * 8 + 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob from (name, info, size_or_type, extra words) and a string table.
    fn blob(types: &[(u32, u32, u32, &[u32])], strings: &[u8]) -> Vec<u8> {
        let mut section = Vec::new();
        for (name, info, size, extra) in types {
            for word in [*name, *info, *size].iter().chain(extra.iter()) {
                section.extend_from_slice(&word.to_le_bytes());
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for word in [
            24u32,
            0,
            section.len() as u32,
            section.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&section);
        out.extend_from_slice(strings);
        out
    }

    fn info(kind: u32, vlen: u32, kind_flag: bool) -> u32 {
        (u32::from(kind_flag) << 31) | (kind << 24) | vlen
    }

    #[test]
    fn members_are_found_through_anonymous_unions_and_bit_fields() {
        // Strings: 0 "", 1 "int", 5 "node", 10 "name", 15 "parent", 22 "__parent", 31 "e", 33 "A".
        let strings = b"\0int\0node\0name\0parent\0__parent\0e\0A\0";
        let types: &[(u32, u32, u32, &[u32])] = &[
            // 1: int
            (1, info(KIND_INT, 0, false), 4, &[32]),
            // 2: int *
            (0, info(KIND_PTR, 0, false), 1, &[]),
            // 3: anonymous union { int *__parent; }
            (0, info(KIND_UNION, 1, false), 8, &[22, 2, 0]),
            // 4: struct node { int name:4 (bit 0); int name2?; union { __parent } at bit 64 }
            (
                5,
                info(KIND_STRUCT, 2, true),
                16,
                &[10, 1, 4 << 24, 0, 3, 64],
            ),
            // 5: enum e { A = 7 }
            (31, info(KIND_ENUM, 1, false), 4, &[33, 7]),
        ];
        let btf = Btf::parse(blob(types, strings)).expect("parses");
        assert_eq!(btf.member_offset("node", "name"), Some(0));
        assert_eq!(btf.member_offset("node", "__parent"), Some(8));
        assert_eq!(btf.member_offset("node", "parent"), None);
        assert_eq!(btf.member_offset("nothing", "name"), None);
        assert_eq!(btf.enum_value("e", "A"), Some(7));
        assert_eq!(btf.enum_value("e", "B"), None);
    }

    #[test]
    fn truncated_or_foreign_blobs_are_none() {
        let strings = b"\0int\0";
        let whole = blob(&[(1, info(KIND_INT, 0, false), 4, &[32])], strings);
        for len in 0..whole.len() {
            // Any cut either parses to something consistent or is refused; never a panic.
            let _ = Btf::parse(whole[..len].to_vec());
        }
        assert!(Btf::parse(b"not btf at all".to_vec()).is_none());
        assert!(Btf::parse(blob(&[(1, info(31, 0, false), 4, &[])], strings)).is_none());
    }

    /// The running kernel's BTF has what the OOM victim's cgroup program needs. Every kernel
    /// npd supports has BTF at `/sys/kernel/btf/vmlinux` (5.10 and later, as built by the
    /// distributions); a kernel without it fails this test rather than skip it.
    #[test]
    fn the_running_kernel_gives_the_victim_cgroup_offsets() {
        let btf = Btf::vmlinux().expect("/sys/kernel/btf/vmlinux is readable BTF");
        let walk = crate::sensor::ebpf::victim_cgroup_offsets(&btf)
            .expect("the running kernel's mark_victim passes the task, and every offset is known");
        let subsys = btf
            .member_offset("css_set", "subsys")
            .expect("css_set.subsys");
        let memory = btf
            .enum_value("cgroup_subsys_id", "memory_cgrp_id")
            .expect("memory_cgrp_id");
        assert_eq!(
            i64::from(walk.css_set_memory),
            i64::from(subsys) + 8 * memory
        );
        assert_ne!(walk.kn_name, walk.kn_parent);
        assert_ne!(walk.task_pid, walk.task_cgroups);
        assert!(btf.raw_tracepoint_arg_is("mark_victim", 0, "task_struct"));
        assert!(!btf.raw_tracepoint_arg_is("mark_victim", 0, "cgroup"));
        assert!(!btf.raw_tracepoint_arg_is("no_such_tracepoint", 0, "task_struct"));
    }
}
