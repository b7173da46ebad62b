//! The reference held to the file model: the keys the parser reads are the keys listed, a
//! default given as a value is the parser's own, and the README carries the table as made here.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, Visitor};
use serde::Deserialize;

use super::{markdown, Default, KEYS};
use crate::config::Config;

type Error = de::value::Error;

/// A deserializer that reads nothing and records every struct field the model asks for, with
/// its path (`ImageCache.Registries.<host>.Insecure`, `ImageCache.Prewarm.Schedules[].Name`).
/// It answers each value with a plausible one so that every nested struct is reached.
struct Lister {
    path: String,
    seen: Rc<RefCell<BTreeSet<String>>>,
}

impl Lister {
    fn at(&self, part: &str) -> Lister {
        Lister {
            path: match (self.path.is_empty(), part.starts_with('[')) {
                (true, _) => part.to_owned(),
                (false, true) => format!("{}{part}", self.path),
                (false, false) => format!("{}.{part}", self.path),
            },
            seen: Rc::clone(&self.seen),
        }
    }
}

struct Fields {
    of: Lister,
    names: std::iter::Copied<std::slice::Iter<'static, &'static str>>,
    next: Option<&'static str>,
}

impl<'de> de::MapAccess<'de> for Fields {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, k: K) -> Result<Option<K::Value>, Error> {
        match self.names.next() {
            Some(n) => {
                self.next = Some(n);
                k.deserialize(n.into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, v: V) -> Result<V::Value, Error> {
        v.deserialize(self.of.at(self.next.unwrap()))
    }
}

/// One entry: a map's key (`<host>`) with its value, or a list's one item.
struct One {
    of: Option<Lister>,
    key: bool,
}

impl<'de> de::MapAccess<'de> for One {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, k: K) -> Result<Option<K::Value>, Error> {
        if self.of.is_none() || !self.key {
            return Ok(None);
        }
        self.key = false;
        k.deserialize("<host>".into_deserializer()).map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, v: V) -> Result<V::Value, Error> {
        v.deserialize(self.of.take().unwrap().at("<host>"))
    }
}

impl<'de> de::SeqAccess<'de> for One {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        t: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.of.take() {
            Some(l) => t.deserialize(l.at("[]")).map(Some),
            None => Ok(None),
        }
    }
}

struct FirstVariant(&'static str);

impl<'de> de::EnumAccess<'de> for FirstVariant {
    type Error = Error;
    type Variant = Self;
    fn variant_seed<V: DeserializeSeed<'de>>(self, v: V) -> Result<(V::Value, Self), Error> {
        Ok((v.deserialize(self.0.into_deserializer())?, self))
    }
}

impl<'de> de::VariantAccess<'de> for FirstVariant {
    type Error = Error;
    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _: T) -> Result<T::Value, Error> {
        Err(de::Error::custom(
            "newtype variants are not part of the file model",
        ))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, Error> {
        Err(de::Error::custom(
            "tuple variants are not part of the file model",
        ))
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Error> {
        Err(de::Error::custom(
            "struct variants are not part of the file model",
        ))
    }
}

impl<'de> Deserializer<'de> for Lister {
    type Error = Error;
    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u64(1)
    }
    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_bool(false)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_f64(1.0)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_f64(1.0)
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        // Durations and paths both read a string: "1s" is both.
        v.visit_str("1s")
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_str("1s")
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_some(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_seq(One {
            of: Some(self),
            key: false,
        })
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_map(One {
            of: Some(self),
            key: true,
        })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        for f in fields {
            self.seen.borrow_mut().insert(self.at(f).path);
        }
        v.visit_map(Fields {
            of: self,
            names: fields.iter().copied(),
            next: None,
        })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_enum(FirstVariant(variants[0]))
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_newtype_struct(self)
    }
    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 char bytes byte_buf unit unit_struct
        tuple tuple_struct identifier ignored_any
    }
}

#[test]
fn every_key_the_parser_reads_is_in_the_reference_and_back() {
    let seen = Rc::new(RefCell::new(BTreeSet::new()));
    Config::deserialize(Lister {
        path: String::new(),
        seen: Rc::clone(&seen),
    })
    .expect("the model is read through");
    let seen = seen.borrow();
    // Sections are not keys: a path with another below it is a section.
    let leaves: BTreeSet<&str> = seen
        .iter()
        .filter(|p| {
            !seen
                .iter()
                .any(|q| q.starts_with(&format!("{p}.")) || q.starts_with(&format!("{p}[]")))
        })
        .map(String::as_str)
        .collect();
    let listed: BTreeSet<&str> = KEYS.iter().map(|k| k.name).collect();
    let missing: Vec<_> = leaves.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&leaves).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "keys the parser reads but the reference lacks: {missing:?}; keys listed but not read: {extra:?}"
    );
    assert_eq!(listed.len(), KEYS.len(), "a key is listed twice");
}

/// A YAML tree built from dotted paths.
#[derive(Default)]
struct Tree(BTreeMap<String, Node>);

enum Node {
    Map(Tree),
    Value(String),
}

impl Tree {
    fn at(&mut self, path: &[&str]) -> &mut Tree {
        let mut t = self;
        for p in path {
            let n =
                t.0.entry(p.to_string())
                    .or_insert_with(|| Node::Map(Tree::default()));
            t = match n {
                Node::Map(m) => m,
                Node::Value(_) => unreachable!("a value holds no key"),
            };
        }
        t
    }

    fn yaml(&self, indent: usize, out: &mut String) {
        if self.0.is_empty() {
            out.push_str(" {}\n");
            return;
        }
        out.push('\n');
        for (k, n) in &self.0 {
            out.push_str(&" ".repeat(indent));
            out.push_str(&format!("\"{k}\":"));
            match n {
                Node::Map(m) => m.yaml(indent + 2, out),
                Node::Value(v) => out.push_str(&format!(" {v}\n")),
            }
        }
    }
}

fn parse(t: &Tree) -> String {
    let mut text = String::from("---");
    t.yaml(0, &mut text);
    let c: Config = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{text}\n{e}"));
    format!("{c:?}")
}

#[test]
fn a_default_given_as_a_value_is_the_parsers_own() {
    let mut checked = 0;
    for k in KEYS {
        let Default::Value(v) = k.default else {
            continue;
        };
        let path: Vec<&str> = k
            .name
            .split('.')
            .map(|p| {
                if p == "<host>" {
                    "registry.example.com"
                } else {
                    p
                }
            })
            .collect();
        let (leaf, parents) = path.split_last().unwrap();
        let mut without = Tree::default();
        without.at(parents);
        let mut with = Tree::default();
        with.at(parents)
            .0
            .insert(leaf.to_string(), Node::Value(v.to_owned()));
        assert_eq!(
            parse(&with),
            parse(&without),
            "{} is documented with the default {v}, which is not the parser's",
            k.name
        );
        checked += 1;
    }
    assert!(checked > 40, "only {checked} defaults were checked");
}

#[test]
fn the_readme_carries_the_reference_as_made_here() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(&markdown()),
        "README.md's configuration table differs from src/config/reference.rs: \
         replace it with the output of `cimaged --config-reference`"
    );
}
