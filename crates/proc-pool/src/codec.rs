//! The encoding of task arguments and results: serde's data model with
//! fixed-width little-endian numbers.
//!
//! Chunks hold many small values (W6: a million `u64`s each way), and here
//! postcard's varints cost 6–9 ns per value to write or read; a fixed-width
//! number is one store or load. The format is bincode's "fixint" layout:
//! integers and floats little-endian at their own width, `bool` one byte,
//! `char` as `u32`, lengths (`str`, bytes, sequences, maps) as `u64`,
//! `Option` a tag byte, enum variants a `u32` index, structs and tuples
//! their fields in order. (bincode itself is unmaintained since 2025: its
//! last release is a `compile_error!`.) Everything read is checked: a
//! short or malformed input is an [`Error`], never a panic.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::ser::{self, Serialize};

use crate::sys::Appender;

/// Why a value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

type Result<T> = std::result::Result<T, Error>;

/// Writes values at the end of a buffer (whose length is stored back when
/// the encoder is dropped: see [`Appender`]).
pub(crate) struct Encoder<'a> {
    pub(crate) out: Appender<'a>,
}

impl<'a> Encoder<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Encoder {
            out: Appender::new(out),
        }
    }

    /// Appends `value`; on failure the buffer is as it was.
    pub(crate) fn encode<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let mark = self.out.len();
        let r = value.serialize(&mut *self);
        if r.is_err() {
            self.out.truncate(mark);
        }
        r
    }

    fn len(&mut self, len: Option<usize>) -> Result<()> {
        let len = len.ok_or_else(|| Error("a sequence of unknown length".into()))?;
        self.out.extend_from_slice(&(len as u64).to_le_bytes());
        Ok(())
    }

    fn variant(&mut self, index: u32) {
        self.out.extend_from_slice(&index.to_le_bytes());
    }
}

macro_rules! put_le {
    ($name:ident, $t:ty) => {
        #[inline]
        fn $name(self, v: $t) -> Result<()> {
            self.out.extend_from_slice(&v.to_le_bytes());
            Ok(())
        }
    };
}

impl<'a, 'b> ser::Serializer for &'a mut Encoder<'b> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn is_human_readable(&self) -> bool {
        false
    }

    fn serialize_bool(self, v: bool) -> Result<()> {
        self.out.push(u8::from(v));
        Ok(())
    }

    put_le!(serialize_i8, i8);
    put_le!(serialize_i16, i16);
    put_le!(serialize_i32, i32);
    put_le!(serialize_i64, i64);
    put_le!(serialize_i128, i128);
    put_le!(serialize_u8, u8);
    put_le!(serialize_u16, u16);
    put_le!(serialize_u32, u32);
    put_le!(serialize_u64, u64);
    put_le!(serialize_u128, u128);
    put_le!(serialize_f32, f32);
    put_le!(serialize_f64, f64);

    fn serialize_char(self, v: char) -> Result<()> {
        self.serialize_u32(u32::from(v))
    }

    fn serialize_str(self, v: &str) -> Result<()> {
        self.serialize_bytes(v.as_bytes())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<()> {
        self.len(Some(v.len()))?;
        self.out.extend_from_slice(v);
        Ok(())
    }

    fn serialize_none(self) -> Result<()> {
        self.out.push(0);
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<()> {
        self.out.push(1);
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<()> {
        Ok(())
    }

    fn serialize_unit_struct(self, _: &'static str) -> Result<()> {
        Ok(())
    }

    fn serialize_unit_variant(self, _: &'static str, index: u32, _: &'static str) -> Result<()> {
        self.variant(index);
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<()> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        value: &T,
    ) -> Result<()> {
        self.variant(index);
        value.serialize(self)
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self> {
        self.len(len)?;
        Ok(self)
    }

    fn serialize_tuple(self, _: usize) -> Result<Self> {
        Ok(self)
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self> {
        Ok(self)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self> {
        self.variant(index);
        Ok(self)
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self> {
        self.len(len)?;
        Ok(self)
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self> {
        Ok(self)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self> {
        self.variant(index);
        Ok(self)
    }
}

macro_rules! compound {
    ($trait:ident, $method:ident $(, $key:ident)?) => {
        impl<'a, 'b> ser::$trait for &'a mut Encoder<'b> {
            type Ok = ();
            type Error = Error;

            fn $method<T: Serialize + ?Sized>(&mut self, $($key: &'static str,)? value: &T) -> Result<()> {
                $(let _ = $key;)?
                value.serialize(&mut **self)
            }

            fn end(self) -> Result<()> {
                Ok(())
            }
        }
    };
}

compound!(SerializeSeq, serialize_element);
compound!(SerializeTuple, serialize_element);
compound!(SerializeTupleStruct, serialize_field);
compound!(SerializeTupleVariant, serialize_field);
compound!(SerializeStruct, serialize_field, key);
compound!(SerializeStructVariant, serialize_field, key);

impl<'a, 'b> ser::SerializeMap for &'a mut Encoder<'b> {
    type Ok = ();
    type Error = Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<()> {
        key.serialize(&mut **self)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<()> {
        Ok(())
    }
}

/// Reads values from the front of a byte string.
pub(crate) struct Decoder<'de> {
    input: &'de [u8],
}

impl<'de> Decoder<'de> {
    pub(crate) fn new(input: &'de [u8]) -> Self {
        Decoder { input }
    }

    /// What is left to decode.
    pub(crate) fn rest(&self) -> &'de [u8] {
        self.input
    }

    /// Decodes the next value.
    pub(crate) fn decode<T: de::Deserialize<'de>>(&mut self) -> Result<T> {
        T::deserialize(&mut *self)
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'de [u8]> {
        if self.input.len() < n {
            return Err(Error("the input ends in the middle of a value".into()));
        }
        let (head, tail) = self.input.split_at(n);
        self.input = tail;
        Ok(head)
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(bytes);
        Ok(a)
    }

    fn len(&mut self) -> Result<usize> {
        let len = u64::from_le_bytes(self.array()?);
        // Every element takes at least... nothing (units): bound by what is
        // left anyway, so a garbled length cannot make a huge allocation.
        usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.input.len().max(1 << 20))
            .ok_or_else(|| Error(format!("a length of {len} is more than the input holds")))
    }

    fn variant(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
}

macro_rules! get_le {
    ($name:ident, $visit:ident, $t:ty) => {
        #[inline]
        fn $name<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
            visitor.$visit(<$t>::from_le_bytes(self.array()?))
        }
    };
}

impl<'de> de::Deserializer<'de> for &mut Decoder<'de> {
    type Error = Error;

    fn is_human_readable(&self) -> bool {
        false
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value> {
        Err(Error("the pool's encoding is not self-describing".into()))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.array::<1>()?[0] {
            0 => visitor.visit_bool(false),
            1 => visitor.visit_bool(true),
            b => Err(Error(format!("{b} is not a bool"))),
        }
    }

    get_le!(deserialize_i8, visit_i8, i8);
    get_le!(deserialize_i16, visit_i16, i16);
    get_le!(deserialize_i32, visit_i32, i32);
    get_le!(deserialize_i64, visit_i64, i64);
    get_le!(deserialize_i128, visit_i128, i128);
    get_le!(deserialize_u8, visit_u8, u8);
    get_le!(deserialize_u16, visit_u16, u16);
    get_le!(deserialize_u32, visit_u32, u32);
    get_le!(deserialize_u64, visit_u64, u64);
    get_le!(deserialize_u128, visit_u128, u128);
    get_le!(deserialize_f32, visit_f32, f32);
    get_le!(deserialize_f64, visit_f64, f64);

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let n = u32::from_le_bytes(self.array()?);
        let c = char::from_u32(n).ok_or_else(|| Error(format!("{n:#x} is not a char")))?;
        visitor.visit_char(c)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let len = self.len()?;
        let bytes = self.take(len)?;
        let s = std::str::from_utf8(bytes).map_err(|e| Error(e.to_string()))?;
        visitor.visit_borrowed_str(s)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let len = self.len()?;
        visitor.visit_borrowed_bytes(self.take(len)?)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.array::<1>()?[0] {
            0 => visitor.visit_none(),
            1 => visitor.visit_some(self),
            b => Err(Error(format!("{b} is not an Option tag"))),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let len = self.len()?;
        visitor.visit_seq(Counted {
            de: self,
            left: len,
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value> {
        visitor.visit_seq(Counted {
            de: self,
            left: len,
        })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_seq(Counted {
            de: self,
            left: len,
        })
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let len = self.len()?;
        visitor.visit_map(Counted {
            de: self,
            left: len,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_seq(Counted {
            de: self,
            left: fields.len(),
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_enum(self)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_u32(self.variant()?)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value> {
        Err(Error("the pool's encoding cannot skip values".into()))
    }
}

/// A sequence, tuple, struct or map of a known number of elements.
struct Counted<'a, 'de> {
    de: &'a mut Decoder<'de>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Counted<'_, 'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> de::MapAccess<'de> for Counted<'_, 'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        seed.deserialize(&mut *self.de)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> de::EnumAccess<'de> for &mut Decoder<'de> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self)> {
        let index = self.variant()?;
        let value = seed.deserialize(index.into_deserializer())?;
        Ok((value, self))
    }
}

impl<'de> de::VariantAccess<'de> for &mut Decoder<'de> {
    type Error = Error;

    fn unit_variant(self) -> Result<()> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value> {
        visitor.visit_seq(Counted {
            de: self,
            left: len,
        })
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_seq(Counted {
            de: self,
            left: fields.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Unit,
        Newtype(i16),
        Tuple(u8, char),
        Struct { name: String, tags: Vec<bool> },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Everything {
        a: (u8, i8, u16, i16, u32, i32, u64, i64, u128, i128),
        f: (f32, f64),
        text: String,
        bytes: Vec<u8>,
        opt: (Option<u32>, Option<String>),
        unit: (),
        shapes: Vec<Shape>,
        map: BTreeMap<String, Vec<u64>>,
        result: std::result::Result<u64, String>,
    }

    fn sample() -> Everything {
        Everything {
            a: (1, -2, 3, -4, 5, -6, u64::MAX, i64::MIN, u128::MAX, -7),
            f: (1.5, -2.25),
            text: "héllo".into(),
            bytes: vec![0, 255, 7],
            opt: (Some(9), None),
            unit: (),
            shapes: vec![
                Shape::Unit,
                Shape::Newtype(-3),
                Shape::Tuple(4, 'ß'),
                Shape::Struct {
                    name: "n".into(),
                    tags: vec![true, false],
                },
            ],
            map: [("k".to_string(), vec![1, 2])].into_iter().collect(),
            result: Err("no".into()),
        }
    }

    #[test]
    fn round_trips_the_data_model() {
        let mut out = Vec::new();
        Encoder::new(&mut out).encode(&sample()).expect("encode");
        let back: Everything = Decoder::new(&out).decode().expect("decode");
        assert_eq!(back, sample());
    }

    #[test]
    fn numbers_are_fixed_width() {
        let mut out = Vec::new();
        Encoder::new(&mut out).encode(&[1u64, 2]).expect("encode");
        assert_eq!(out.len(), 2 * 8);
        let mut out = Vec::new();
        Encoder::new(&mut out)
            .encode(&vec![1u64, 2])
            .expect("encode");
        assert_eq!(out.len(), 8 + 2 * 8);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let mut out = Vec::new();
        Encoder::new(&mut out).encode(&sample()).expect("encode");
        for cut in 0..out.len() {
            assert!(Decoder::new(&out[..cut]).decode::<Everything>().is_err());
        }
    }

    #[test]
    fn garbled_input_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        Encoder::new(&mut out).encode(&sample()).expect("encode");
        for i in 0..out.len() {
            for flip in [1u8, 0x80, 0xff] {
                let mut bad = out.clone();
                bad[i] ^= flip;
                let _ = Decoder::new(&bad).decode::<Everything>();
            }
        }
        // A huge length is refused before allocating.
        let mut huge = Vec::new();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Decoder::new(&huge).decode::<Vec<u64>>().is_err());
    }
}
