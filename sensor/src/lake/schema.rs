//! The Arrow schema of the Parquet files, derived from the event model.
//!
//! There is no list of columns here. The schema is traced from `Event`'s
//! own `Deserialize` (what serde's derive says the type holds: field names
//! as serialized, `Option`s, `Vec`s, nested structs, unit enums), so a
//! field the event model gains, loses or moves is a column gained, lost or
//! moved, nested as OCSF nests it: objects are structs, arrays are lists.
//!
//! serde_arrow's own tracer (`SchemaLike::from_type`) cannot be used: it
//! refuses the one value that is not typed, `evidences[].data` (a
//! `serde_json::Value`, OCSF type `json`), even with an overwrite for that
//! path. This tracer is the same idea, smaller: a `Deserializer` that
//! answers each request with a default value and notes what was asked. A
//! value that is only `deserialize_any` (self-describing JSON) becomes a
//! UTF-8 column holding the JSON text (`JSON_COLUMNS` names the only such
//! path, and a test checks it). serde_arrow then fills the arrays from the
//! events' `Serialize`, against this schema.
//!
//! Integer widths follow OCSF's types, which Security Lake's tables use:
//! `integer` (32-bit signed) for the model's u8, u16 and i32, `long`
//! (64-bit signed) for u32, u64 and i64. Every column is nullable: the
//! events leave out what has no value (`skip_serializing_none`, empty
//! lists), and a reader sees that as null.

use std::sync::Arc;

use arrow_schema::{DataType, Field, FieldRef, Fields, Schema};
use serde::de::{self, DeserializeSeed, Visitor};

/// The columns that hold JSON text rather than typed values, by path
/// (`list.element` for a list's items).
#[cfg(test)]
pub const JSON_COLUMNS: &[&str] = &["evidences.element.data"];

/// Arrow metadata key on a JSON-text column: readers that know it (the
/// Arrow "JSON" canonical extension type) parse the text.
const EXTENSION_NAME: &str = "ARROW:extension:name";

/// Nesting deeper than this is a recursive type, which no table can hold.
const MAX_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
#[error("tracing the event schema: {0}")]
pub struct TraceError(String);

impl de::Error for TraceError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        TraceError(msg.to_string())
    }
}

/// What a type turned out to be.
#[derive(Clone, Debug)]
enum Node {
    Bool,
    /// OCSF `integer`.
    Int32,
    /// OCSF `long`.
    Int64,
    Float64,
    Utf8,
    /// A unit enum, written as its variant's name (the first one named,
    /// which `full_sample` uses).
    Enum(#[cfg_attr(not(test), allow(dead_code))] &'static str),
    /// Self-describing (`deserialize_any`): written as JSON text.
    Json,
    List(Box<Node>),
    Struct(Vec<(String, Node)>),
}

/// The Arrow schema of `T` (the event model's `Event`).
pub fn trace<T: for<'de> serde::Deserialize<'de>>() -> Result<Schema, TraceError> {
    match trace_nodes::<T>()? {
        Some(Node::Struct(fields)) => Ok(Schema::new(
            fields
                .into_iter()
                .map(|(name, n)| field(&name, n, &name))
                .collect::<Fields>(),
        )),
        other => Err(TraceError(format!("the event is not a struct: {other:?}"))),
    }
}

/// The shape of `T`, as deserializing it asks for it.
fn trace_nodes<T: for<'de> serde::Deserialize<'de>>() -> Result<Option<Node>, TraceError> {
    let mut node = None;
    T::deserialize(Tracer {
        out: &mut node,
        path: String::new(),
        depth: 0,
    })?;
    Ok(node)
}

fn field(name: &str, node: Node, path: &str) -> FieldRef {
    let (data_type, json) = match node {
        Node::Bool => (DataType::Boolean, false),
        Node::Int32 => (DataType::Int32, false),
        Node::Int64 => (DataType::Int64, false),
        Node::Float64 => (DataType::Float64, false),
        Node::Utf8 | Node::Enum(_) => (DataType::Utf8, false),
        Node::Json => (DataType::Utf8, true),
        Node::List(item) => {
            let path = format!("{path}.element");
            let mut item = Arc::unwrap_or_clone(field("element", *item, &path));
            // A list's items are never null; the list may be.
            item.set_nullable(false);
            (DataType::List(Arc::new(item)), false)
        }
        Node::Struct(fields) => (
            DataType::Struct(
                fields
                    .into_iter()
                    .map(|(n, node)| field(&n, node, &format!("{path}.{n}")))
                    .collect(),
            ),
            false,
        ),
    };
    let mut f = Field::new(name, data_type, true);
    if json {
        f = f.with_metadata(std::collections::HashMap::from([(
            EXTENSION_NAME.to_owned(),
            "arrow.json".to_owned(),
        )]));
    }
    Arc::new(f)
}

/// The paths (dot-separated, `element` for list items) of every column
/// holding JSON text, in schema order.
#[cfg(test)]
pub fn json_columns(schema: &Schema) -> Vec<String> {
    fn walk(f: &Field, path: String, out: &mut Vec<String>) {
        if f.metadata().contains_key(EXTENSION_NAME) {
            out.push(path.clone());
        }
        match f.data_type() {
            DataType::Struct(fields) => {
                for c in fields {
                    walk(c, format!("{path}.{}", c.name()), out);
                }
            }
            DataType::List(item) => walk(item, format!("{path}.element"), out),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for f in schema.fields() {
        walk(f, f.name().clone(), &mut out);
    }
    out
}

/// A `Deserializer` that records, into `out`, the shape of whatever is
/// deserialized from it.
struct Tracer<'a> {
    out: &'a mut Option<Node>,
    path: String,
    depth: usize,
}

impl Tracer<'_> {
    fn set(self, n: Node) {
        *self.out = Some(n);
    }

    fn child<'b>(&self, out: &'b mut Option<Node>, name: &str) -> Result<Tracer<'b>, TraceError> {
        if self.depth >= MAX_DEPTH {
            return Err(TraceError(format!(
                "{}: nested more than {MAX_DEPTH} deep (a recursive type?)",
                self.path
            )));
        }
        Ok(Tracer {
            out,
            path: if self.path.is_empty() {
                name.to_owned()
            } else {
                format!("{}.{name}", self.path)
            },
            depth: self.depth + 1,
        })
    }

    fn unsupported<T>(&self, what: &str) -> Result<T, TraceError> {
        Err(TraceError(format!(
            "{}: {what} has no column type (the event model should not hold one)",
            if self.path.is_empty() {
                "the event"
            } else {
                &self.path
            }
        )))
    }
}

macro_rules! primitive {
    ($($method:ident => $node:expr, $visit:ident($value:expr);)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
                self.set($node);
                visitor.$visit($value)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for Tracer<'_> {
    type Error = TraceError;

    primitive! {
        deserialize_bool => Node::Bool, visit_bool(false);
        deserialize_i8 => Node::Int32, visit_i8(0);
        deserialize_i16 => Node::Int32, visit_i16(0);
        deserialize_i32 => Node::Int32, visit_i32(0);
        deserialize_i64 => Node::Int64, visit_i64(0);
        deserialize_u8 => Node::Int32, visit_u8(0);
        deserialize_u16 => Node::Int32, visit_u16(0);
        deserialize_u32 => Node::Int64, visit_u32(0);
        deserialize_u64 => Node::Int64, visit_u64(0);
        deserialize_f32 => Node::Float64, visit_f32(0.0);
        deserialize_f64 => Node::Float64, visit_f64(0.0);
        deserialize_char => Node::Utf8, visit_char(' ');
        deserialize_str => Node::Utf8, visit_str("");
        deserialize_string => Node::Utf8, visit_string(String::new());
    }

    /// Only self-describing values ask for this: JSON text.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        self.set(Node::Json);
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        // Every column is nullable; the inner type is the column's.
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        let mut item = None;
        let value = visitor.visit_seq(OneItem {
            tracer: Some(self.child(&mut item, "element")?),
        })?;
        let item =
            item.ok_or_else(|| TraceError(format!("{}: a list without items", self.path)))?;
        self.set(Node::List(Box::new(item)));
        Ok(value)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let mut traced = Vec::with_capacity(fields.len());
        let value = visitor.visit_map(StructFields {
            parent: &self,
            fields,
            next: 0,
            traced: &mut traced,
        })?;
        self.set(Node::Struct(traced));
        Ok(value)
    }

    /// Unit enums (`key_use`, `identified`, ...) are their names: text.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let Some(first) = variants.first() else {
            return self.unsupported("an enum without variants");
        };
        let value = visitor.visit_enum(UnitVariant {
            name: first,
            path: &self.path,
        })?;
        self.set(Node::Enum(first));
        Ok(value)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        visitor.visit_str("")
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        visitor.visit_unit()
    }

    fn deserialize_i128<V: Visitor<'de>>(self, _: V) -> Result<V::Value, TraceError> {
        self.unsupported("a 128-bit integer")
    }
    fn deserialize_u128<V: Visitor<'de>>(self, _: V) -> Result<V::Value, TraceError> {
        self.unsupported("a 128-bit integer")
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, _: V) -> Result<V::Value, TraceError> {
        self.unsupported("raw bytes")
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, _: V) -> Result<V::Value, TraceError> {
        self.unsupported("raw bytes")
    }
    fn deserialize_unit<V: Visitor<'de>>(self, _: V) -> Result<V::Value, TraceError> {
        self.unsupported("a unit value")
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: V,
    ) -> Result<V::Value, TraceError> {
        self.unsupported("a unit struct")
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, TraceError> {
        self.unsupported("a tuple")
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        _: V,
    ) -> Result<V::Value, TraceError> {
        self.unsupported("a tuple struct")
    }
    fn deserialize_map<V: Visitor<'de>>(self, _: V) -> Result<V::Value, TraceError> {
        self.unsupported("a map with keys not known from the type")
    }
}

/// A list of exactly one item, traced.
struct OneItem<'a> {
    tracer: Option<Tracer<'a>>,
}

impl<'de> de::SeqAccess<'de> for OneItem<'_> {
    type Error = TraceError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, TraceError> {
        match self.tracer.take() {
            Some(t) => seed.deserialize(t).map(Some),
            None => Ok(None),
        }
    }
}

/// A struct's fields, each traced, in declaration order.
struct StructFields<'a, 'b> {
    parent: &'a Tracer<'b>,
    fields: &'static [&'static str],
    next: usize,
    traced: &'a mut Vec<(String, Node)>,
}

impl<'de> de::MapAccess<'de> for StructFields<'_, '_> {
    type Error = TraceError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, TraceError> {
        let Some(&name) = self.fields.get(self.next) else {
            return Ok(None);
        };
        seed.deserialize(de::value::BorrowedStrDeserializer::new(name))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, TraceError> {
        let name = self.fields[self.next];
        self.next += 1;
        let mut node = None;
        let value = seed.deserialize(self.parent.child(&mut node, name)?)?;
        let node = node.ok_or_else(|| {
            TraceError(format!(
                "{}.{name}: nothing was deserialized",
                self.parent.path
            ))
        })?;
        self.traced.push((name.to_owned(), node));
        Ok(value)
    }
}

/// The first variant of a unit enum.
struct UnitVariant<'a> {
    name: &'static str,
    path: &'a str,
}

impl<'de> de::EnumAccess<'de> for UnitVariant<'_> {
    type Error = TraceError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self), TraceError> {
        let v = seed.deserialize(de::value::BorrowedStrDeserializer::new(self.name))?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for UnitVariant<'_> {
    type Error = TraceError;

    fn unit_variant(self) -> Result<(), TraceError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _: T) -> Result<T::Value, TraceError> {
        Err(self.data_variant())
    }

    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, TraceError> {
        Err(self.data_variant())
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, TraceError> {
        Err(self.data_variant())
    }
}

impl UnitVariant<'_> {
    fn data_variant(&self) -> TraceError {
        TraceError(format!(
            "{}: an enum variant with data has no column type (only unit enums, written as their names)",
            self.path
        ))
    }
}

/// A JSON value of `T` with every field present: each string `"x"`, each
/// number 1, each list one item, each enum its first variant, each JSON
/// value an object. Deserialized into `T`, it is the fullest value the
/// model can hold, whatever fields it has (`lake/tests.rs`).
#[cfg(test)]
pub fn full_sample<T: for<'de> serde::Deserialize<'de>>() -> serde_json::Value {
    fn sample(n: &Node) -> serde_json::Value {
        use serde_json::json;
        match n {
            Node::Bool => json!(true),
            Node::Int32 | Node::Int64 => json!(1),
            Node::Float64 => json!(1.5),
            Node::Utf8 => json!("x"),
            Node::Enum(v) => json!(v),
            Node::Json => json!({"class_uid": 1005, "nested": {"a": [1, 2]}}),
            Node::List(item) => json!([sample(item)]),
            Node::Struct(fields) => serde_json::Value::Object(
                fields.iter().map(|(k, v)| (k.clone(), sample(v))).collect(),
            ),
        }
    }
    sample(&trace_nodes::<T>().unwrap().unwrap())
}
