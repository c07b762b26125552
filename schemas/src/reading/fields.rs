//! A device message parsed just far enough for validation: straight from the JSON text into
//! fixed slots, without a `serde_json::Value` tree. Strings borrow from the payload unless they
//! hold an escape, so a reading costs no allocation until it is accepted.
//!
//! The reading of JSON is `serde_json`'s, with its `Value` semantics kept: a repeated name keeps
//! its last value, numbers keep their three kinds (unsigned, negative, float), and any syntax
//! error anywhere refuses the whole message.

use super::MAX_READINGS_PER_MESSAGE;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;
use std::borrow::Cow;
use std::fmt;

/// Visitor methods for the scalars (and null), all answering `$value`.
macro_rules! scalars {
    ($value:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// The whole payload: one item, or an array of them.
pub(super) enum Payload<'a> {
    One(Item<'a>),
    /// The first [`MAX_READINGS_PER_MESSAGE`] elements, and how many there were in all.
    Array {
        items: Vec<Item<'a>>,
        len: usize,
    },
}

/// One reading's place: an object, or anything else (which is refused).
pub(super) enum Item<'a> {
    Object(Fields<'a>),
    NotObject,
}

/// A reading object: the contract's fields in their slots, any other name in `extras`,
/// sorted by name with one entry per name (the order a `serde_json::Map` iterates in while its
/// `preserve_order` feature is off, as it is here).
#[derive(Default)]
pub(super) struct Fields<'a> {
    pub device_id: Option<Field<'a>>,
    pub timestamp: Option<Field<'a>>,
    pub seq: Option<Field<'a>>,
    pub temperature: Option<Field<'a>>,
    pub humidity: Option<Field<'a>>,
    pub pressure: Option<Field<'a>>,
    pub extras: Vec<(Cow<'a, str>, Field<'a>)>,
}

/// One field's value.
pub(super) enum Field<'a> {
    Null,
    Bool(bool),
    Number(Number),
    Str(Cow<'a, str>),
    /// An array or an object (parsed through, never kept).
    Nested,
}

impl<'de> de::Deserialize<'de> for Payload<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Payload<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                let mut len = 0;
                loop {
                    if len < MAX_READINGS_PER_MESSAGE {
                        match seq.next_element::<Item>()? {
                            Some(item) => items.push(item),
                            None => break,
                        }
                    } else if seq.next_element::<Skip>()?.is_none() {
                        // Past the limit the message is refused whole: read through, keep nothing.
                        break;
                    }
                    len += 1;
                }
                Ok(Payload::Array { items, len })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                fields(map).map(|f| Payload::One(Item::Object(f)))
            }
            scalars!(Payload::One(Item::NotObject));
        }
        d.deserialize_any(V)
    }
}

impl<'de> de::Deserialize<'de> for Item<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Item<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Skip.visit_seq(seq).map(|Skip| Item::NotObject)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                fields(map).map(Item::Object)
            }
            scalars!(Item::NotObject);
        }
        d.deserialize_any(V)
    }
}

fn fields<'de, A: MapAccess<'de>>(mut map: A) -> Result<Fields<'de>, A::Error> {
    let mut out = Fields::default();
    while let Some(Text(name)) = map.next_key()? {
        let value = map.next_value()?;
        let slot = match &*name {
            "deviceId" => &mut out.device_id,
            "timestamp" => &mut out.timestamp,
            "seq" => &mut out.seq,
            "temperature" => &mut out.temperature,
            "humidity" => &mut out.humidity,
            "pressure" => &mut out.pressure,
            _ => {
                out.extras.push((name, value));
                continue;
            }
        };
        *slot = Some(value);
    }
    // One entry per name, the last one given, in name order: reversed, a stable sort puts the
    // last of equal names first, and `dedup_by` keeps the first of a run.
    if out.extras.len() > 1 {
        out.extras.reverse();
        out.extras.sort_by(|a, b| a.0.cmp(&b.0));
        out.extras.dedup_by(|a, b| a.0 == b.0);
    }
    Ok(out)
}

/// A string that borrows from the payload when it can.
struct Text<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> de::Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Field::Bool(b))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Field::Number(n.into()))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Field::Number(n.into()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Self::Value, E> {
        // The parser yields only finite floats, the ones a `Number` holds.
        Number::from_f64(n)
            .map(Field::Number)
            .ok_or_else(|| E::custom("a JSON number is finite"))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(s.to_owned())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Skip.visit_seq(seq).map(|Skip| Field::Nested)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Skip.visit_map(map).map(|Skip| Field::Nested)
    }
}

/// Any JSON value, read through and dropped the way `serde_json::Value` reads it: nesting
/// deeper than the parser's limit or a number beyond `f64` refuses the message here too
/// (`serde::de::IgnoredAny` would let both pass, changing which messages are JSON).
struct Skip;

impl<'de> de::Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Skip)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = Skip;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
    scalars!(Skip);
}

/// Parses a payload (already known to be UTF-8).
pub(super) fn parse(text: &str) -> serde_json::Result<Payload<'_>> {
    serde_json::from_str(text)
}
