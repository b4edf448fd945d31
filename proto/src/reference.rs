//! The gRPC API reference, `proto/API.md`, rendered from the compiled descriptor set.
//!
//! Everything in it comes from the `.proto` files: names, types and numbers from the
//! descriptors, prose from the comments protox keeps (source code info). Who uses a service
//! and which status codes an rpc answers are written in those comments, next to the
//! definitions they describe, so a change to the schema and to its documentation is one edit.
//! Only what holds across rpcs is written here: the introduction, what each status code means
//! from meshd, and the statuses any rpc may answer (the bearer token, shut-down, message size
//! limits).
//!
//! The output is deterministic: files in the order build.rs compiles them, definitions in
//! file order, anchors named after the full protobuf names (stable across reorderings).

use std::collections::{BTreeMap, HashMap};

use prost::Message as _;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    FileDescriptorSet, ServiceDescriptorProto,
    field_descriptor_proto::{Label, Type},
    source_code_info::Location,
};

/// The command that rewrites `proto/API.md`; the drift test names it.
pub const COMMAND: &str = "cargo run -p meshd-proto --bin api-reference";

/// The reference for every schema of this crate, as Markdown.
pub fn render() -> Result<String, prost::DecodeError> {
    let set = FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET)?;
    Ok(render_set(&set))
}

/// The reference for the files of `set`; files of `google/protobuf/` (pulled in as imports)
/// are referred to, not documented.
pub fn render_set(set: &FileDescriptorSet) -> String {
    let files: Vec<&FileDescriptorProto> = set
        .file
        .iter()
        .filter(|f| !f.name().starts_with("google/protobuf/"))
        .collect();
    let types = TypeIndex::new(&files);
    let mut doc = Doc::default();
    doc.line(format!(
        "<!-- Generated from the .proto comments by `{COMMAND}`; do not edit. -->"
    ));
    doc.line(
        "<!-- Edit the comments in proto/proto/ and run the command: `cargo test` fails while \
         this file differs from what they render. -->",
    );
    doc.blank();
    doc.line("# meshd gRPC API reference");
    doc.blank();
    doc.para(INTRODUCTION);
    contents(&mut doc, &files);
    status_codes(&mut doc, &files);
    for file in &files {
        render_file(&mut doc, file, &types);
    }
    doc.finish()
}

const INTRODUCTION: &str = "\
Every service, rpc, message and enum of the schemas in `proto/proto/`, with the comments \
written next to them. One gRPC port (`[grpc] listen`, default `127.0.0.1:50056`) serves \
`MeshData`, `MeshControl`, `MeshService`, `MeshDataService` and `ServiceControllerService`, \
beside `grpc.health.v1.Health` and server reflection (so `grpcurl` needs no .proto files). \
`meshd.v1` link messages travel only between meshd processes, in link frames \
(`proto/FRAMES.md`). Each service's comment says who calls it: `core` (the platform's Go \
service, through its generated stubs), an operator (`grpcurl`, or the `meshd mesh` \
subcommands) and `loadgen`.";

/// Builds Markdown line by line; one blank line between blocks, never two.
#[derive(Default)]
struct Doc {
    out: String,
}

impl Doc {
    fn line(&mut self, text: impl AsRef<str>) {
        self.out.push_str(text.as_ref());
        self.out.push('\n');
    }

    fn blank(&mut self) {
        if !self.out.is_empty() && !self.out.ends_with("\n\n") {
            self.out.push('\n');
        }
    }

    /// A block of text followed by a blank line (nothing for empty text).
    fn para(&mut self, text: &str) {
        if text.trim().is_empty() {
            return;
        }
        self.line(text.trim_end());
        self.blank();
    }

    fn anchor(&mut self, id: &str) {
        self.line(format!("<a id=\"{id}\"></a>"));
    }

    fn finish(mut self) -> String {
        while self.out.ends_with("\n\n") {
            self.out.pop();
        }
        self.out
    }
}

/// How a message or enum of the documented files is linked to.
struct TypeRef {
    /// Its full name without the leading dot (also its anchor).
    full: String,
    package: String,
}

/// Every documented type by its full name (`.pkg.Name`), and the map entries by theirs, so
/// fields can link to their types and show `map<K, V>` instead of the synthetic entry.
struct TypeIndex {
    types: HashMap<String, TypeRef>,
    map_entries: HashMap<String, (FieldDescriptorProto, FieldDescriptorProto)>,
    /// Where each type is used (rpcs and fields), as Markdown links, in file order: what
    /// turns a request message without a comment into one that says which rpc takes it.
    uses: HashMap<String, Vec<String>>,
}

impl TypeIndex {
    fn new(files: &[&FileDescriptorProto]) -> Self {
        let mut index = Self {
            types: HashMap::new(),
            map_entries: HashMap::new(),
            uses: HashMap::new(),
        };
        for file in files {
            let package = file.package().to_owned();
            for message in &file.message_type {
                index.add_message(&package, &package, message);
            }
            for e in &file.enum_type {
                index.add(&package, &package, e.name());
            }
        }
        for file in files {
            let package = file.package();
            for service in &file.service {
                let full = join(package, service.name());
                for method in &service.method {
                    let rpc = format!(
                        "[`{}.{}`](#{})",
                        service.name(),
                        method.name(),
                        join(&full, method.name())
                    );
                    index.use_of(method.input_type(), format!("request of {rpc}"));
                    index.use_of(method.output_type(), format!("response of {rpc}"));
                }
            }
            for message in &file.message_type {
                index.add_field_uses(package, message);
            }
        }
        index
    }

    fn use_of(&mut self, type_name: &str, text: String) {
        if self.types.contains_key(type_name) {
            let uses = self.uses.entry(type_name.to_owned()).or_default();
            if !uses.contains(&text) {
                uses.push(text);
            }
        }
    }

    fn add_field_uses(&mut self, scope: &str, message: &DescriptorProto) {
        if is_map_entry(message) {
            return;
        }
        let full = join(scope, message.name());
        let short = full
            .rsplit_once('.')
            .map_or(full.as_str(), |(_, name)| name)
            .to_owned();
        for field in &message.field {
            let used = match self.map_entries.get(field.type_name()) {
                Some((_, value)) => value.type_name().to_owned(),
                None => field.type_name().to_owned(),
            };
            if !used.is_empty() {
                let text = format!("field [`{short}.{}`](#{full})", field.name());
                self.use_of(&used, text);
            }
        }
        for nested in &message.nested_type {
            self.add_field_uses(&full, nested);
        }
    }

    /// "Used as …" for a type, or "" when nothing refers to it.
    fn uses_of(&self, full: &str) -> String {
        match self.uses.get(&format!(".{full}")) {
            Some(uses) if !uses.is_empty() => format!("Used as: {}.", uses.join(", ")),
            _ => String::new(),
        }
    }

    fn add(&mut self, package: &str, scope: &str, name: &str) {
        let full = join(scope, name);
        self.types.insert(
            format!(".{full}"),
            TypeRef {
                full,
                package: package.to_owned(),
            },
        );
    }

    fn add_message(&mut self, package: &str, scope: &str, message: &DescriptorProto) {
        let full = join(scope, message.name());
        if is_map_entry(message) {
            let key = message.field.iter().find(|f| f.number() == 1);
            let value = message.field.iter().find(|f| f.number() == 2);
            if let (Some(key), Some(value)) = (key, value) {
                self.map_entries
                    .insert(format!(".{full}"), (key.clone(), value.clone()));
            }
            return;
        }
        self.add(package, scope, message.name());
        for nested in &message.nested_type {
            self.add_message(package, &full, nested);
        }
        for e in &message.enum_type {
            self.add(package, &full, e.name());
        }
    }

    /// A type name as Markdown: a link for documented types (short within their own
    /// package), code for the rest (`google.protobuf.Empty`).
    fn link(&self, type_name: &str, from_package: &str) -> String {
        match self.types.get(type_name) {
            Some(t) => {
                let shown = if t.package == from_package {
                    t.full
                        .strip_prefix(&format!("{}.", t.package))
                        .unwrap_or(&t.full)
                } else {
                    &t.full
                };
                format!("[`{shown}`](#{})", t.full)
            }
            None => format!("`{}`", type_name.trim_start_matches('.')),
        }
    }

    /// A field's type as Markdown (`map<K, V>` for map fields).
    fn field_type(&self, field: &FieldDescriptorProto, from_package: &str) -> String {
        if let Some((key, value)) = self.map_entries.get(field.type_name()) {
            return match value.r#type() {
                Type::Message | Type::Enum | Type::Group => format!(
                    "`map<{}, `{}`>`",
                    scalar_name(key.r#type()),
                    self.link(value.type_name(), from_package)
                ),
                scalar => format!(
                    "`map<{}, {}>`",
                    scalar_name(key.r#type()),
                    scalar_name(scalar)
                ),
            };
        }
        self.scalar_or_link(field, from_package)
    }

    fn scalar_or_link(&self, field: &FieldDescriptorProto, from_package: &str) -> String {
        match field.r#type() {
            Type::Message | Type::Enum | Type::Group => self.link(field.type_name(), from_package),
            scalar => format!("`{}`", scalar_name(scalar)),
        }
    }

    fn is_map(&self, field: &FieldDescriptorProto) -> bool {
        self.map_entries.contains_key(field.type_name())
    }
}

fn join(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_owned()
    } else {
        format!("{scope}.{name}")
    }
}

fn is_map_entry(message: &DescriptorProto) -> bool {
    message
        .options
        .as_ref()
        .is_some_and(|o| o.map_entry.unwrap_or(false))
}

fn scalar_name(t: Type) -> &'static str {
    match t {
        Type::Double => "double",
        Type::Float => "float",
        Type::Int64 => "int64",
        Type::Uint64 => "uint64",
        Type::Int32 => "int32",
        Type::Fixed64 => "fixed64",
        Type::Fixed32 => "fixed32",
        Type::Bool => "bool",
        Type::String => "string",
        Type::Group => "group",
        Type::Message => "message",
        Type::Bytes => "bytes",
        Type::Uint32 => "uint32",
        Type::Enum => "enum",
        Type::Sfixed32 => "sfixed32",
        Type::Sfixed64 => "sfixed64",
        Type::Sint32 => "sint32",
        Type::Sint64 => "sint64",
    }
}

// Field numbers in descriptor.proto: the paths of source code info locations.
const FILE_MESSAGE: i32 = 4;
const FILE_ENUM: i32 = 5;
const FILE_SERVICE: i32 = 6;
const FILE_SYNTAX: i32 = 12;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED: i32 = 3;
const MESSAGE_ENUM: i32 = 4;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

/// The comments of one file, by location path.
struct Comments<'a> {
    by_path: HashMap<&'a [i32], &'a Location>,
}

impl<'a> Comments<'a> {
    fn new(file: &'a FileDescriptorProto) -> Self {
        let by_path = file
            .source_code_info
            .iter()
            .flat_map(|info| &info.location)
            .map(|l| (l.path.as_slice(), l))
            .collect();
        Self { by_path }
    }

    /// The comment above an element, else the one after it on its line; dedented.
    fn of(&self, path: &[i32]) -> String {
        let Some(location) = self.by_path.get(path) else {
            return String::new();
        };
        let text = match (&location.leading_comments, &location.trailing_comments) {
            (Some(leading), _) if !leading.trim().is_empty() => leading,
            (_, Some(trailing)) => trailing,
            _ => return String::new(),
        };
        dedent(text)
    }

    /// The file's own comment: what stands above its `syntax` statement, detached
    /// paragraphs included.
    fn of_file(&self) -> String {
        let Some(location) = self.by_path.get([FILE_SYNTAX].as_slice()) else {
            return String::new();
        };
        let mut parts: Vec<String> = location
            .leading_detached_comments
            .iter()
            .map(|c| dedent(c))
            .collect();
        if let Some(leading) = &location.leading_comments {
            parts.push(dedent(leading));
        }
        parts.retain(|p| !p.is_empty());
        parts.join("\n\n")
    }
}

/// `// text` comments come as " text" lines: one leading space goes, the rest of the
/// indentation stays (it may be a list's continuation).
fn dedent(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end())
        .collect();
    lines.join("\n").trim_matches('\n').to_owned()
}

/// Makes comment text safe as Markdown prose: `<` and `>` outside code spans would be read
/// as HTML.
fn prose(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_code = false;
    for c in text.chars() {
        match c {
            '`' => {
                in_code = !in_code;
                out.push(c);
            }
            '<' if !in_code => out.push_str("&lt;"),
            '>' if !in_code => out.push_str("&gt;"),
            _ => out.push(c),
        }
    }
    out
}

/// Comment text for a table cell: one line, pipes escaped (GitHub splits cells on them even
/// inside code spans), paragraphs and list items kept apart by `<br>`.
fn cell(text: &str) -> String {
    // Breaks are marked with a control character while the text is escaped, then turned
    // into the `<br>` tags the escaping would otherwise have mangled.
    const BREAK: char = '\u{1}';
    let mut out = String::new();
    for (i, paragraph) in text.split("\n\n").enumerate() {
        if i > 0 {
            out.push_str(&format!("{BREAK}{BREAK}"));
        }
        for (j, line) in paragraph.lines().enumerate() {
            let line = line.trim();
            if j > 0 {
                out.push(if line.starts_with("- ") { BREAK } else { ' ' });
            }
            out.push_str(line);
        }
    }
    prose(&out).replace('|', "\\|").replace(BREAK, "<br>")
}

/// The first sentence of a comment, for summary tables.
fn summary(text: &str) -> String {
    let first = text.split("\n\n").next().unwrap_or("");
    let flat = first.lines().map(str::trim).collect::<Vec<_>>().join(" ");
    let end = flat
        .match_indices(". ")
        .map(|(i, _)| i + 1)
        .next()
        .unwrap_or(flat.len());
    cell(&flat[..end])
}

fn file_anchor(file: &FileDescriptorProto) -> String {
    format!("file-{}", file.name().replace(['/', '.'], "-"))
}

fn contents(doc: &mut Doc, files: &[&FileDescriptorProto]) {
    doc.line("## Contents");
    doc.blank();
    doc.line("- [Status codes](#status-codes)");
    for file in files {
        doc.line(format!(
            "- [`{}`](#{}): package `{}`",
            file.name(),
            file_anchor(file),
            file.package()
        ));
        let package = file.package();
        for service in &file.service {
            let full = join(package, service.name());
            doc.line(format!("  - service [`{}`](#{full})", service.name()));
        }
        let messages = file
            .message_type
            .iter()
            .filter(|m| !is_map_entry(m))
            .map(|m| format!("[`{}`](#{})", m.name(), join(package, m.name())))
            .collect::<Vec<_>>();
        if !messages.is_empty() {
            doc.line(format!("  - messages: {}", messages.join(", ")));
        }
        let enums = file
            .enum_type
            .iter()
            .map(|e| format!("[`{}`](#{})", e.name(), join(package, e.name())))
            .collect::<Vec<_>>();
        if !enums.is_empty() {
            doc.line(format!("  - enums: {}", enums.join(", ")));
        }
    }
    doc.blank();
}

/// gRPC status codes with their numbers (what `PublishClientDataResponse.code` carries) and
/// what they mean from meshd.
const CODES: &[(u8, &str, &str)] = &[
    (
        0,
        "OK",
        "Success; also `PublishClientDataResponse.code` 0 (a batch accepted).",
    ),
    (
        1,
        "CANCELLED",
        "The client cancelled the call (or dropped its stream); meshd never sends it itself.",
    ),
    (
        2,
        "UNKNOWN",
        "Not sent by meshd's handlers; a client may see it for a broken transport.",
    ),
    (
        3,
        "INVALID_ARGUMENT",
        "The request is wrong as sent (a missing or oversized field, a value out of range); \
         the message says which field. Sending it again unchanged fails again.",
    ),
    (
        4,
        "DEADLINE_EXCEEDED",
        "meshd's own wait ran out (a dial, a join, a lifecycle answer, a stream's targets); \
         the rpc's comment says whether the work may still complete.",
    ),
    (
        5,
        "NOT_FOUND",
        "A node, link or stream the request names is not known here.",
    ),
    (
        6,
        "ALREADY_EXISTS",
        "A new stream id collided with an open stream (a ULID collision: retry).",
    ),
    (
        7,
        "PERMISSION_DENIED",
        "The mesh refused this node's join key.",
    ),
    (
        8,
        "RESOURCE_EXHAUSTED",
        "A bound of this node is reached (waiting sends, streams, outstanding messages, data \
         stream groups); retry once some work finished.",
    ),
    (
        9,
        "FAILED_PRECONDITION",
        "The node's state does not allow it now (no mesh, already in one, the mesh is \
         CRITICAL, no control group leader with a quorum, a tenant not served); nothing was \
         done, so the same request may succeed once the state changes.",
    ),
    (10, "ABORTED", "Not sent by meshd."),
    (
        11,
        "OUT_OF_RANGE",
        "A request message larger than the service's decoding limit (see below).",
    ),
    (
        12,
        "UNIMPLEMENTED",
        "The rpc has no handler (`MeshControl.InjectNeighbor`), or the server does not know it.",
    ),
    (
        13,
        "INTERNAL",
        "A local store (redb) or the control group failed; the message has the cause.",
    ),
    (
        14,
        "UNAVAILABLE",
        "The node is shutting down (on any rpc that needs another thread), a peer could not \
         be reached, or the outcome of a write is unknown; the rpc's comment says which.",
    ),
    (15, "DATA_LOSS", "Not sent by meshd."),
    (
        16,
        "UNAUTHENTICATED",
        "A token is configured and the call lacks `authorization: Bearer <token>` (see \
         below).",
    ),
];

const EVERY_RPC: &str = "\
Statuses any rpc may answer, whatever its comment says:

- `UNAUTHENTICATED`: the node has a bearer token (`[grpc] token_file` or \
`MESHD_GRPC__TOKEN`, required on any address but loopback) and the call's metadata lacks \
`authorization: Bearer <token>`. The check runs before every service, health and reflection \
included.
- `UNAVAILABLE` \"the node is shutting down\": the rpc needed the control thread, a shard or a \
stream worker, and it stopped. Open `Subscribe` streams end with it at shut-down; other \
streams get 2 s and are then cut.
- `OUT_OF_RANGE`: a request message over the service's decoding limit (tonic's check): \
`network.max_payload_bytes` + 64 KiB for `MeshData` and `MeshDataService`; the larger of \
that and `streams.max_message_bytes` + 64 KiB for `MeshService`; tonic's default 4 MiB for \
`MeshControl` and `ServiceControllerService`.
- `CANCELLED`, `DEADLINE_EXCEEDED` set by the client's own deadline or cancellation.

Outcomes reported inside a response rather than as a status: `MeshData.Send`'s \
`MessageStatus`, `AddSession`'s and `DropSession`'s `error_code`, each `PublishAck`'s \
`error`, each `PublishClientDataResponse`'s `code` (a gRPC code number), `Start`'s and \
`Configure`'s `success`.";

/// Whole-word, upper-case occurrences of status code names in `text`.
fn codes_named(text: &str) -> Vec<&'static str> {
    let words: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
        .collect();
    CODES
        .iter()
        .filter(|(number, ..)| *number != 0)
        .map(|(_, code, _)| *code)
        .filter(|code| words.contains(code))
        .collect()
}

fn status_codes(doc: &mut Doc, files: &[&FileDescriptorProto]) {
    doc.anchor("status-codes");
    doc.line("## Status codes");
    doc.blank();
    doc.para(
        "Each rpc's comment lists the status codes its handler returns and when (\"Errors:\"). \
         The table below indexes them: for each code, what it means from meshd and every rpc \
         whose comment names it.",
    );
    let mut by_code: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for file in files {
        let comments = Comments::new(file);
        for (s, service) in file.service.iter().enumerate() {
            for (m, method) in service.method.iter().enumerate() {
                let text = comments.of(&[FILE_SERVICE, s as i32, SERVICE_METHOD, m as i32]);
                for code in codes_named(&text) {
                    if let Some(i) = CODES.iter().position(|(_, c, _)| *c == code) {
                        let full = join(&join(file.package(), service.name()), method.name());
                        by_code.entry(i).or_default().push(format!(
                            "[`{}.{}`](#{full})",
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
    }
    doc.line("| code | meaning in meshd | rpcs that document it |");
    doc.line("| --- | --- | --- |");
    for (i, (number, code, meaning)) in CODES.iter().enumerate() {
        let rpcs = by_code.get(&i).map(|r| r.join(", ")).unwrap_or_default();
        doc.line(format!(
            "| {number} `{code}` | {} | {rpcs} |",
            cell(meaning)
        ));
    }
    doc.blank();
    doc.para(&prose(EVERY_RPC));
}

fn render_file(doc: &mut Doc, file: &FileDescriptorProto, types: &TypeIndex) {
    let comments = Comments::new(file);
    let package = file.package();
    doc.anchor(&file_anchor(file));
    doc.line(format!("## `{}`", file.name()));
    doc.blank();
    doc.para(&format!("Package `{package}`."));
    doc.para(&prose(&comments.of_file()));
    for (s, service) in file.service.iter().enumerate() {
        render_service(doc, &comments, package, s as i32, service, types);
    }
    if !file.message_type.is_empty() {
        doc.line(format!("### Messages of `{}`", file.name()));
        doc.blank();
        for (m, message) in file.message_type.iter().enumerate() {
            render_message(
                doc,
                &comments,
                package,
                package,
                &[FILE_MESSAGE, m as i32],
                message,
                types,
            );
        }
    }
    if !file.enum_type.is_empty() {
        doc.line(format!("### Enums of `{}`", file.name()));
        doc.blank();
        for (e, en) in file.enum_type.iter().enumerate() {
            render_enum(doc, &comments, package, &[FILE_ENUM, e as i32], en, types);
        }
    }
}

fn rpc_kind(client_streaming: bool, server_streaming: bool) -> &'static str {
    match (client_streaming, server_streaming) {
        (false, false) => "unary",
        (false, true) => "server streaming",
        (true, false) => "client streaming",
        (true, true) => "bidirectional streaming",
    }
}

fn render_service(
    doc: &mut Doc,
    comments: &Comments<'_>,
    package: &str,
    index: i32,
    service: &ServiceDescriptorProto,
    types: &TypeIndex,
) {
    let full = join(package, service.name());
    doc.anchor(&full);
    doc.line(format!("### Service `{}`", service.name()));
    doc.blank();
    doc.para(&format!("`{full}`"));
    doc.para(&prose(&comments.of(&[FILE_SERVICE, index])));
    doc.line("| rpc | request | response | kind | summary |");
    doc.line("| --- | --- | --- | --- | --- |");
    for (m, method) in service.method.iter().enumerate() {
        let text = comments.of(&[FILE_SERVICE, index, SERVICE_METHOD, m as i32]);
        doc.line(format!(
            "| [`{}`](#{}) | {}{} | {}{} | {} | {} |",
            method.name(),
            join(&full, method.name()),
            if method.client_streaming() {
                "stream "
            } else {
                ""
            },
            types.link(method.input_type(), package),
            if method.server_streaming() {
                "stream "
            } else {
                ""
            },
            types.link(method.output_type(), package),
            rpc_kind(method.client_streaming(), method.server_streaming()),
            summary(&text),
        ));
    }
    doc.blank();
    for (m, method) in service.method.iter().enumerate() {
        let text = comments.of(&[FILE_SERVICE, index, SERVICE_METHOD, m as i32]);
        doc.anchor(&join(&full, method.name()));
        doc.line(format!("#### `{}.{}`", service.name(), method.name()));
        doc.blank();
        doc.para(&format!(
            "`{}({}{})` → `{}{}`, {}; path `/{full}/{}`",
            method.name(),
            if method.client_streaming() {
                "stream "
            } else {
                ""
            },
            short(method.input_type(), package),
            if method.server_streaming() {
                "stream "
            } else {
                ""
            },
            short(method.output_type(), package),
            rpc_kind(method.client_streaming(), method.server_streaming()),
            method.name(),
        ));
        if text.is_empty() {
            doc.para("*No comment in the .proto file.*");
        } else {
            doc.para(&prose(&text));
        }
    }
}

/// A type's name as the .proto file writes it from `package`.
fn short(type_name: &str, package: &str) -> String {
    let name = type_name.trim_start_matches('.');
    name.strip_prefix(&format!("{package}."))
        .unwrap_or(name)
        .to_owned()
}

fn render_message(
    doc: &mut Doc,
    comments: &Comments<'_>,
    package: &str,
    scope: &str,
    path: &[i32],
    message: &DescriptorProto,
    types: &TypeIndex,
) {
    if is_map_entry(message) {
        return;
    }
    let full = join(scope, message.name());
    doc.anchor(&full);
    let shown = full
        .strip_prefix(&format!("{package}."))
        .unwrap_or(&full)
        .to_owned();
    doc.line(format!("#### `{shown}`"));
    doc.blank();
    doc.para(&prose(&comments.of(path)));
    doc.para(&types.uses_of(&full));
    if message.field.is_empty() {
        doc.para("No fields.");
    } else {
        doc.line("| field | number | type | label | description |");
        doc.line("| --- | --- | --- | --- | --- |");
        for (f, field) in message.field.iter().enumerate() {
            let mut field_path = path.to_vec();
            field_path.extend([MESSAGE_FIELD, f as i32]);
            let label = field_label(message, field, types);
            doc.line(format!(
                "| `{}` | {} | {} | {} | {} |",
                field.name(),
                field.number(),
                types.field_type(field, package),
                label,
                cell(&comments.of(&field_path)),
            ));
        }
        doc.blank();
    }
    for (n, nested) in message.nested_type.iter().enumerate() {
        let mut nested_path = path.to_vec();
        nested_path.extend([MESSAGE_NESTED, n as i32]);
        render_message(doc, comments, package, &full, &nested_path, nested, types);
    }
    for (e, en) in message.enum_type.iter().enumerate() {
        let mut enum_path = path.to_vec();
        enum_path.extend([MESSAGE_ENUM, e as i32]);
        render_enum(doc, comments, &full, &enum_path, en, types);
    }
}

fn field_label(
    message: &DescriptorProto,
    field: &FieldDescriptorProto,
    types: &TypeIndex,
) -> String {
    if types.is_map(field) {
        return "map".to_owned();
    }
    if field.proto3_optional() {
        return "optional".to_owned();
    }
    if let Some(oneof) = field
        .oneof_index
        .and_then(|i| message.oneof_decl.get(usize::try_from(i).ok()?))
    {
        return format!("oneof `{}`", oneof.name());
    }
    match field.label() {
        Label::Repeated => "repeated".to_owned(),
        Label::Required => "required".to_owned(),
        Label::Optional => "singular".to_owned(),
    }
}

fn render_enum(
    doc: &mut Doc,
    comments: &Comments<'_>,
    scope: &str,
    path: &[i32],
    en: &EnumDescriptorProto,
    types: &TypeIndex,
) {
    let full = join(scope, en.name());
    doc.anchor(&full);
    doc.line(format!("#### `{}`", en.name()));
    doc.blank();
    doc.para(&prose(&comments.of(path)));
    doc.para(&types.uses_of(&full));
    doc.line("| value | number | description |");
    doc.line("| --- | --- | --- |");
    for (v, value) in en.value.iter().enumerate() {
        let mut value_path = path.to_vec();
        value_path.extend([ENUM_VALUE, v as i32]);
        doc.line(format!(
            "| `{}` | {} | {} |",
            value.name(),
            value.number(),
            cell(&comments.of(&value_path)),
        ));
    }
    doc.blank();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_dedented_and_cells_stay_on_one_line() {
        assert_eq!(dedent(" a\n  b\n"), "a\n b");
        assert_eq!(
            cell("x | y\n- one\n- two\n\nnext"),
            "x \\| y<br>- one<br>- two<br><br>next"
        );
        assert_eq!(prose("a <b> `c<d>`"), "a &lt;b&gt; `c<d>`");
    }

    #[test]
    fn a_summary_is_the_first_sentence() {
        assert_eq!(summary("Does x. Then y.\n\nMore."), "Does x.");
        assert_eq!(summary("No full stop"), "No full stop");
    }

    #[test]
    fn status_code_numbers_match_grpc() {
        for (i, (number, name, _)) in CODES.iter().enumerate() {
            assert_eq!(usize::from(*number), i);
            let camel = format!("{:?}", tonic::Code::from(i32::from(*number)));
            let mut snake = String::new();
            for (j, c) in camel.chars().enumerate() {
                if c.is_ascii_uppercase() && j > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_uppercase());
            }
            assert_eq!(&snake, name);
        }
    }

    #[test]
    fn status_codes_are_found_as_whole_words() {
        assert_eq!(
            codes_named("NOT_FOUND when gone; INVALID_ARGUMENT or NOT_FOUNDS"),
            vec!["INVALID_ARGUMENT", "NOT_FOUND"]
        );
    }

    #[test]
    fn every_schema_file_is_documented_and_comments_survive() {
        let text = render().expect("the descriptor set decodes");
        for file in [
            "mesh/v1/data.proto",
            "mesh/v1/control.proto",
            "meshd/v1/link.proto",
            "meshd/v1/mesh.proto",
            "supervisor/v1/supervisor.proto",
        ] {
            assert!(text.contains(&format!("## `{file}`")), "{file} missing");
        }
        assert!(!text.contains("google/protobuf/empty.proto"));
        // A comment protox must have kept (source code info).
        assert!(text.contains("The destination node has never been part of the mesh."));
    }
}
