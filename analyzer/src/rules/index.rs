//! Which rules an event can select, found by hashing its field values
//! instead of testing every rule.
//!
//! Operators write many rules of one shape: "this key may only be used by
//! nginx", once per key. Testing each of them on every event made rule
//! evaluation most of a pipeline shard's time. Most rules have an
//! exact-match condition (`key.spki_sha256: …`, `key.algorithm: …`); such a
//! rule can only select an event that carries one of its values in that
//! field. So each rule is filed under one such condition, and an event
//! looks up its own values, once per indexed field. Rules without one are
//! tested on every event. Candidates are then tested whole, in rule order:
//! the index only skips rules that cannot select the event.

use hashbrown::HashMap;

use super::{
    Rule, Test,
    fields::{FIELDS, Kind, Value, Visit},
};
use crate::event::Event;

#[derive(Clone, Debug, Default)]
pub struct RuleIndex {
    /// Per indexed field: how to read it, and value → rules (ascending).
    fields: Vec<IndexedField>,
    /// Rules with no exact-match condition.
    always: Vec<usize>,
    /// Per rule: the condition it is filed under. A rule found through the
    /// index has that condition met already (its value was the key).
    pub indexed_condition: Vec<Option<usize>>,
}

#[derive(Clone, Debug)]
struct IndexedField {
    name: &'static str,
    visit: Visit,
    rules_by_value: HashMap<String, Vec<usize>>,
}

impl RuleIndex {
    pub fn build(rules: &[Rule]) -> Self {
        let mut index = RuleIndex::default();
        for (i, rule) in rules.iter().enumerate() {
            // A SHA-256 condition names one key or binary: the most
            // selective. Otherwise the first exact-match condition.
            let exact = |c: &&super::Condition| matches!(c.test, Test::Text(_));
            let sha256 = |c: &&super::Condition| {
                FIELDS
                    .iter()
                    .any(|f| f.name == c.field && f.kind == Kind::Sha256)
            };
            let chosen = rule
                .conditions
                .iter()
                .enumerate()
                .filter(|(_, c)| exact(c))
                .find(|(_, c)| sha256(c))
                .or_else(|| rule.conditions.iter().enumerate().find(|(_, c)| exact(c)));
            index.indexed_condition.push(chosen.map(|(at, _)| at));
            let Some((_, c)) = chosen else {
                index.always.push(i);
                continue;
            };
            let Test::Text(values) = &c.test else {
                unreachable!("chosen for being exact-match")
            };
            let at = match index.fields.iter().position(|f| f.name == c.field) {
                Some(at) => at,
                None => {
                    index.fields.push(IndexedField {
                        name: c.field,
                        visit: c.visit,
                        rules_by_value: HashMap::new(),
                    });
                    index.fields.len() - 1
                }
            };
            for v in values {
                let list = index.fields[at]
                    .rules_by_value
                    .entry(v.clone())
                    .or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        index
    }

    /// Rules that may select `event`, ascending, each once, into `out`
    /// (a buffer the caller keeps, so an event allocates nothing here).
    pub fn candidates(&self, event: &Event, out: &mut Vec<usize>) {
        out.clear();
        out.extend_from_slice(&self.always);
        for f in &self.fields {
            (f.visit)(event, &mut |v| {
                if let Value::Str(s) = v
                    && let Some(rules) = f.rules_by_value.get(s)
                {
                    out.extend_from_slice(rules);
                }
                false
            });
        }
        out.sort_unstable();
        out.dedup();
    }
}
