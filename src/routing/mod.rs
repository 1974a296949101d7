//! Deciding which endpoints an event goes to: a table of routes, each `{id, endpoint, filter}`.
//!
//! Pure: no IO and no locks. A table is immutable once built; the daemon builds a new one when
//! routes change and swaps it in whole (arc-swap), so an event is routed by exactly one version of
//! the routes.
//!
//! An event goes to every endpoint at least one route to it matches, once, however many of its
//! routes match (ADT delivers once per endpoint). Routes are evaluated in table order; a route to
//! an endpoint already chosen is skipped, and so is a route whose filter is constant `false`
//! (a disabled route). All filters are compiled together when the table is built: the `$body`
//! paths of all of them are extracted in one scan of the body, at most once per event and only
//! when a route needs it; each attribute is looked up once per event; and a route that requires,
//! say, `type` to be one of a few values is skipped with a bit test when it is not (see
//! `filter::eval`).

use crate::event::CloudEvent;
use crate::filter::{Compiled, Compiler, Env, Explanation, Filter, Shared};
use smallvec::SmallVec;
use std::fmt;

/// A route as configured: events matching `filter` go to the endpoint named `endpoint`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub id: String,
    pub endpoint: String,
    pub filter: Filter,
}

/// An immutable set of routes, ready to route events.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Distinct endpoint names in first-seen order; [`EndpointSet`] holds indexes into it.
    endpoints: Vec<String>,
    /// The routes that can match (not disabled), in `routes` order, compiled against `shared`.
    compiled: Vec<CompiledRoute>,
    /// Every `$body` path of every filter, extracted together, and the attribute dictionaries.
    shared: Shared,
}

#[derive(Debug, Clone)]
struct CompiledRoute {
    /// Index into `endpoints`, as the word and bit of an [`EndpointSet`].
    word: usize,
    mask: u64,
    filter: Compiled,
}

impl RouteTable {
    /// Builds a table; endpoints are numbered in the order routes first name them.
    pub fn new(routes: Vec<Route>) -> RouteTable {
        let mut endpoints: Vec<String> = Vec::new();
        let mut compiler = Compiler::table();
        let compiled = routes
            .iter()
            .filter_map(|route| {
                let endpoint = match endpoints.iter().position(|e| *e == route.endpoint) {
                    Some(i) => i,
                    None => {
                        endpoints.push(route.endpoint.clone());
                        endpoints.len() - 1
                    }
                };
                let filter = compiler.add(route.filter.expr());
                // A constant `false` filter (a disabled route) is never evaluated.
                (filter.constant() != Some(false)).then_some(CompiledRoute {
                    word: endpoint / 64,
                    mask: 1 << (endpoint % 64),
                    filter,
                })
            })
            .collect();
        RouteTable { routes, endpoints, compiled, shared: compiler.finish() }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Endpoint names; an [`EndpointSet`] index is a position in this slice.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The endpoints the event goes to.
    pub fn route(&self, event: &CloudEvent) -> EndpointSet {
        let mut env = Env::new(event, &self.shared);
        if self.endpoints.len() <= 128 {
            // The common case, with the set on the stack.
            let mut chosen = [0u64; 2];
            for route in &self.compiled {
                let word = &mut chosen[route.word & 1];
                if *word & route.mask == 0 && route.filter.eval(&mut env) {
                    *word |= route.mask;
                }
            }
            return EndpointSet::from_bits(u128::from(chosen[0]) | u128::from(chosen[1]) << 64);
        }
        let mut words: SmallVec<[u64; 2]> = SmallVec::from_elem(0, self.endpoints.len().div_ceil(64));
        for route in &self.compiled {
            if words[route.word] & route.mask == 0 && route.filter.eval(&mut env) {
                words[route.word] |= route.mask;
            }
        }
        EndpointSet { words }
    }

    /// Every route's explanation for the event, in table order (nothing skipped):
    /// `(route id, endpoint, explanation)`.
    pub fn explain(&self, event: &CloudEvent) -> Vec<(String, String, Explanation)> {
        self.routes.iter().map(|r| (r.id.clone(), r.endpoint.clone(), r.filter.explain(event))).collect()
    }
}

/// A set of endpoint indexes (see [`RouteTable::endpoints`]): a bitset, inline (no allocation)
/// up to 128 endpoints. Iterates in ascending order.
#[derive(Clone, Default)]
pub struct EndpointSet {
    words: SmallVec<[u64; 2]>,
}

impl EndpointSet {
    pub fn new() -> Self {
        Self::default()
    }

    fn from_bits(bits: u128) -> Self {
        let (low, high) = (bits as u64, (bits >> 64) as u64);
        let mut words = SmallVec::new();
        if bits != 0 {
            words.push(low);
        }
        if high != 0 {
            words.push(high);
        }
        EndpointSet { words }
    }

    pub fn insert(&mut self, index: usize) {
        let word = index / 64;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (index % 64);
    }

    pub fn contains(&self, index: usize) -> bool {
        self.words.get(index / 64).is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Endpoint indexes in ascending order.
    pub fn iter(&self) -> EndpointIter<'_> {
        EndpointIter { words: &self.words, word: 0, bits: self.words.first().copied().unwrap_or(0) }
    }
}

/// Equal when they hold the same indexes, however they were built.
impl PartialEq for EndpointSet {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for EndpointSet {}

impl std::hash::Hash for EndpointSet {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for i in self.iter() {
            i.hash(state);
        }
    }
}

impl fmt::Debug for EndpointSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromIterator<usize> for EndpointSet {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut set = EndpointSet::new();
        for i in iter {
            set.insert(i);
        }
        set
    }
}

impl<'a> IntoIterator for &'a EndpointSet {
    type Item = usize;
    type IntoIter = EndpointIter<'a>;
    fn into_iter(self) -> EndpointIter<'a> {
        self.iter()
    }
}

/// Iterator over an [`EndpointSet`].
pub struct EndpointIter<'a> {
    words: &'a [u64],
    /// Index of the word `bits` came from.
    word: usize,
    /// The bits of that word not yet returned.
    bits: u64,
}

impl Iterator for EndpointIter<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        while self.bits == 0 {
            self.word += 1;
            self.bits = *self.words.get(self.word)?;
        }
        let bit = self.bits.trailing_zeros() as usize;
        self.bits &= self.bits - 1;
        Some(self.word * 64 + bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{parse_structured, CloudEvent};

    fn route(id: &str, endpoint: &str, filter: &str) -> Route {
        Route { id: id.into(), endpoint: endpoint.into(), filter: Filter::parse(filter).unwrap() }
    }

    fn event(ty: &str, subject: &str, data: &str) -> CloudEvent {
        parse_structured(
            format!(
                r#"{{"specversion":"1.0","id":"1","source":"adt.example","type":"{ty}","subject":"{subject}","data":{data}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn names(table: &RouteTable, set: &EndpointSet) -> Vec<String> {
        set.iter().map(|i| table.endpoints()[i].clone()).collect()
    }

    #[test]
    fn no_routes_route_nowhere() {
        let table = RouteTable::new(vec![]);
        let set = table.route(&event("t", "s", "{}"));
        assert!(set.is_empty());
        assert_eq!(set.len(), 0);
        assert!(table.endpoints().is_empty());
        assert!(table.explain(&event("t", "s", "{}")).is_empty());
    }

    #[test]
    fn endpoints_are_numbered_in_first_seen_order_and_deduplicated() {
        let table = RouteTable::new(vec![
            route("r1", "hub", "true"),
            route("r2", "bus", "type = 'x'"),
            route("r3", "hub", "subject = 'a'"),
            route("r4", "grid", "$body.t > 1"),
        ]);
        assert_eq!(table.endpoints(), ["hub", "bus", "grid"]);
        assert_eq!(table.routes().len(), 4);
        let set = table.route(&event("x", "a", r#"{"t": 2}"#));
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(set.len(), 3);
        assert_eq!(names(&table, &set), ["hub", "bus", "grid"]);
    }

    #[test]
    fn an_endpoint_is_chosen_once_and_its_later_routes_are_skipped() {
        // The second route to `hub` would also match; it is not evaluated and `hub` appears once.
        let table = RouteTable::new(vec![
            route("a", "hub", "type = 'x'"),
            route("b", "hub", "subject = 's'"),
            route("c", "bus", "type = 'nope'"),
        ]);
        let set = table.route(&event("x", "s", "{}"));
        assert_eq!(names(&table, &set), ["hub"]);
        // When the first route to an endpoint fails, a later one to it still counts.
        let set = table.route(&event("y", "s", "{}"));
        assert_eq!(names(&table, &set), ["hub"]);
    }

    #[test]
    fn false_routes_never_match() {
        let table = RouteTable::new(vec![
            route("off", "hub", "false"),
            route("off2", "bus", "type = 5"),
            route("on", "grid", "true"),
        ]);
        let set = table.route(&event("x", "s", "{}"));
        assert_eq!(names(&table, &set), ["grid"]);
        assert_eq!(table.endpoints(), ["hub", "bus", "grid"]);
    }

    #[test]
    fn body_filters_share_one_extraction_with_their_own_slots() {
        let table = RouteTable::new(vec![
            route("a", "e1", "$body.b.c = 1"),
            route("b", "e2", "$body.a = 'x' AND $body.b.c = 1"),
            route("c", "e3", "$body.z != null"),
            route("d", "e4", "$body.a = 'y'"),
        ]);
        let set = table.route(&event("t", "s", r#"{"a": "x", "b": {"c": 1}}"#));
        assert_eq!(names(&table, &set), ["e1", "e2"]);
        let set = table.route(&event("t", "s", r#"{"a": "y", "z": 0}"#));
        assert_eq!(names(&table, &set), ["e3", "e4"]);
    }

    #[test]
    fn explain_covers_every_route() {
        let table =
            RouteTable::new(vec![route("a", "hub", "type = 'x'"), route("b", "hub", "subject = 'nope'")]);
        let explained = table.explain(&event("x", "s", "{}"));
        assert_eq!(explained.len(), 2);
        assert_eq!((explained[0].0.as_str(), explained[0].1.as_str()), ("a", "hub"));
        assert!(explained[0].2.matched);
        assert!(!explained[1].2.matched);
        assert_eq!(explained[1].2.to_string(), "`subject = 'nope'` is false: subject is 's'");
    }

    #[test]
    fn endpoint_sets_beyond_128_and_in_order() {
        let mut set: EndpointSet = [200, 3, 64, 127, 0].into_iter().collect();
        set.insert(3);
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 3, 64, 127, 200]);
        assert_eq!(set.len(), 5);
        assert!(set.contains(200) && !set.contains(199) && !set.contains(10_000));
        assert_eq!(format!("{set:?}"), "{0, 3, 64, 127, 200}");
        assert_eq!(EndpointSet::from_bits(1 << 70), [70].into_iter().collect());
        assert_eq!(EndpointSet::from_bits(0), EndpointSet::new());
        let mut grown = EndpointSet::new();
        grown.insert(300);
        assert_ne!(grown, EndpointSet::new());
        let routes: Vec<Route> = (0..150)
            .map(|i| route(&format!("r{i}"), &format!("e{i}"), &format!("subject = 's{}'", i % 50)))
            .collect();
        let table = RouteTable::new(routes);
        let set = table.route(&event("t", "s7", "{}"));
        assert_eq!(set.iter().collect::<Vec<_>>(), [7, 57, 107]);
    }
}
