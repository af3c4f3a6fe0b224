//! Peer geography and network from MaxMind databases (GeoLite2/GeoIP2 City
//! or Country, and ASN or ISP), read with `maxminddb`.
//!
//! A database file replaced on disk (the usual way updates arrive) is
//! picked up by `refresh`, which the sensor calls on a timer: the new file
//! is opened and checked before it replaces the old reader, so a truncated
//! or corrupt update leaves the previous data in use and says why.

use std::{
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use compact_str::CompactString;
use maxminddb::{Reader, geoip2};
use serde::Deserialize;

use crate::event::{AutonomousSystem, Event, Location};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct GeoError {
    pub path: PathBuf,
    pub why: String,
}

/// (device, inode, mtime ns, size): a replaced file differs in one of them.
type FileId = (u64, u64, i64, u64);

/// The open database and the file it was read from.
type Loaded = Option<(Arc<Reader<Vec<u8>>>, FileId)>;

struct Db {
    path: PathBuf,
    current: RwLock<Loaded>,
}

fn file_id(path: &Path) -> std::io::Result<FileId> {
    let m = std::fs::metadata(path)?;
    Ok((
        m.dev(),
        m.ino(),
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        m.size(),
    ))
}

impl Db {
    fn open(path: &Path) -> Result<Self, GeoError> {
        let db = Db {
            path: path.to_owned(),
            current: RwLock::new(None),
        };
        db.refresh()?;
        Ok(db)
    }

    /// Reloads the file if it changed. Returns whether it did.
    fn refresh(&self) -> Result<bool, GeoError> {
        let err = |why: String| GeoError {
            path: self.path.clone(),
            why,
        };
        let id = file_id(&self.path).map_err(|e| err(format!("cannot read: {e}")))?;
        if let Some((_, old)) = &*self.current.read().expect("geo lock")
            && *old == id
        {
            return Ok(false);
        }
        let reader = Reader::open_readfile(&self.path)
            .map_err(|e| err(format!("not a MaxMind database: {e}")))?;
        *self.current.write().expect("geo lock") = Some((Arc::new(reader), id));
        Ok(true)
    }

    fn reader(&self) -> Option<Arc<Reader<Vec<u8>>>> {
        self.current
            .read()
            .expect("geo lock")
            .as_ref()
            .map(|(r, _)| r.clone())
    }
}

/// The configured databases; either may be absent.
pub struct Geo {
    city: Option<Db>,
    asn: Option<Db>,
    /// Bumped when a database is reloaded (see `GeoView`).
    generation: AtomicU64,
}

/// The databases as one reader (a pipeline shard) holds them between
/// reloads. Looking up through `Geo` itself takes a lock and touches a
/// reference count that every shard shares; a view only reads the
/// generation, and takes a new view when it changed.
pub struct GeoView {
    generation: u64,
    city: Option<Arc<Reader<Vec<u8>>>>,
    asn: Option<Arc<Reader<Vec<u8>>>>,
}

/// The two fields of a City or Country record that events carry. Decoding
/// only these skips the rest of a real record (names in eight languages,
/// continent, subdivisions, location), and borrows instead of copying.
#[derive(Deserialize)]
struct CityRecord<'a> {
    #[serde(borrow, default)]
    country: Option<CountryRecord<'a>>,
    #[serde(borrow, default)]
    city: Option<CityName<'a>>,
}

#[derive(Deserialize)]
struct CountryRecord<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct CityName<'a> {
    #[serde(borrow, default)]
    names: Option<EnglishName<'a>>,
}

#[derive(Deserialize)]
struct EnglishName<'a> {
    #[serde(borrow, default)]
    en: Option<&'a str>,
}

impl Geo {
    /// Opens the databases. `city` is a City or Country database, `asn` an
    /// ASN or ISP one.
    pub fn open(city: Option<&Path>, asn: Option<&Path>) -> Result<Self, GeoError> {
        Ok(Geo {
            city: city.map(Db::open).transpose()?,
            asn: asn.map(Db::open).transpose()?,
            generation: AtomicU64::new(0),
        })
    }

    /// Reloads replaced files. Errors leave the previous data in use.
    pub fn refresh(&self) -> Vec<Result<bool, GeoError>> {
        let results: Vec<_> = [&self.city, &self.asn]
            .into_iter()
            .flatten()
            .map(Db::refresh)
            .collect();
        if results.iter().any(|r| matches!(r, Ok(true))) {
            self.generation.fetch_add(1, Ordering::Release);
        }
        results
    }

    /// The databases as loaded now.
    pub fn view(&self) -> GeoView {
        GeoView {
            generation: self.generation.load(Ordering::Acquire),
            city: self.city.as_ref().and_then(Db::reader),
            asn: self.asn.as_ref().and_then(Db::reader),
        }
    }

    /// `view` kept current: replaced when a database was reloaded since.
    pub fn refresh_view(&self, view: &mut Option<GeoView>) {
        let now = self.generation.load(Ordering::Acquire);
        if view.as_ref().is_none_or(|v| v.generation != now) {
            *view = Some(self.view());
        }
    }

    /// Where an address is, and whose network it is in.
    pub fn lookup(&self, ip: IpAddr) -> (Option<Location>, Option<AutonomousSystem>) {
        self.view().lookup(ip)
    }

    /// Fills `peer.location` and `peer.autonomous_system` of an event that
    /// has a peer address.
    pub fn enrich(&self, event: &mut Event) {
        self.view().enrich(event)
    }
}

impl GeoView {
    /// Where an address is, and whose network it is in.
    pub fn lookup(&self, ip: IpAddr) -> Answer {
        self.lookup_with_prefix(ip).0
    }

    /// `lookup`, and the longest prefix of the networks the databases
    /// matched (how narrow the range with this same answer may be).
    fn lookup_with_prefix(&self, ip: IpAddr) -> (Answer, u8) {
        fn found<'r>(
            r: &'r Reader<Vec<u8>>,
            ip: IpAddr,
            prefix: &mut u8,
        ) -> Option<maxminddb::LookupResult<'r, Vec<u8>>> {
            let Ok(result) = r.lookup(ip) else {
                *prefix = 128; // an error says nothing of the neighbours
                return None;
            };
            // No network: assume the narrowest, so nothing is shared.
            *prefix = (*prefix).max(result.network().map_or(128, |n| n.prefix()));
            Some(result)
        }
        let mut prefix = 0u8;
        let city = self.city.as_deref().and_then(|r| found(r, ip, &mut prefix));
        let asn = self.asn.as_deref().and_then(|r| found(r, ip, &mut prefix));
        let location = city.and_then(|result| {
            let record: CityRecord = result.decode().ok()??;
            let loc = Location {
                country: record
                    .country
                    .and_then(|c| c.iso_code)
                    .map(CompactString::from),
                city: record
                    .city
                    .and_then(|c| c.names)
                    .and_then(|n| n.en)
                    .map(CompactString::from),
            };
            (loc.country.is_some() || loc.city.is_some()).then_some(loc)
        });
        let asn = asn.and_then(|result| {
            let a: geoip2::Asn = result.decode().ok()??;
            Some(AutonomousSystem {
                number: a.autonomous_system_number?,
                name: a.autonomous_system_organization.map(CompactString::from),
            })
        });
        ((location, asn), prefix)
    }

    /// Fills `peer.location` and `peer.autonomous_system` of an event that
    /// has a peer address.
    pub fn enrich(&self, event: &mut Event) {
        // A cache of capacity 0 looks every address up (and allocates nothing).
        self.enrich_cached(event, &mut GeoCache::new(0))
    }
}

/// What a lookup found: where an address is, and whose network it is in.
pub type Answer = (Option<Location>, Option<AutonomousSystem>);

/// Recent answers of one reader (a pipeline shard), so the clients a key
/// serves again and again cost a hash lookup instead of two tree walks and
/// two record decodes.
///
/// Exact, never approximate: an answer is filed under its /24 (IPv4) or /48
/// (IPv6) only when both databases' matching networks are at least that
/// wide, so every address in it has the same answer; otherwise under the
/// address itself. Cleared when a database is reloaded, and when full
/// (cheaper than keeping recency for every hit).
pub struct GeoCache {
    capacity: usize,
    generation: u64,
    answers: hashbrown::HashMap<(IpAddr, u8), Answer>,
}

impl GeoCache {
    /// `capacity` 0 caches nothing.
    pub fn new(capacity: usize) -> Self {
        GeoCache {
            capacity,
            generation: u64::MAX,
            answers: hashbrown::HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.answers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

/// The /24 or /48 an address is in, as a cache key.
fn block_of(ip: IpAddr) -> (IpAddr, u8) {
    match ip {
        IpAddr::V4(v4) => (IpAddr::V4((u32::from(v4) & 0xffff_ff00).into()), BLOCK_V4),
        IpAddr::V6(v6) => (
            IpAddr::V6((u128::from(v6) & !((1u128 << 80) - 1)).into()),
            BLOCK_V6,
        ),
    }
}

const BLOCK_V4: u8 = 24;
const BLOCK_V6: u8 = 48;

impl GeoView {
    /// `lookup` through a cache.
    pub fn lookup_cached(&self, ip: IpAddr, cache: &mut GeoCache) -> Answer {
        if cache.capacity == 0 {
            return self.lookup(ip);
        }
        if cache.generation != self.generation {
            cache.answers.clear();
            cache.generation = self.generation;
        }
        let block = block_of(ip);
        let exact = (ip, if ip.is_ipv4() { 32 } else { 128 });
        if let Some(a) = cache
            .answers
            .get(&block)
            .or_else(|| cache.answers.get(&exact))
        {
            return a.clone();
        }
        let (answer, widest_prefix) = self.lookup_with_prefix(ip);
        if cache.answers.len() >= cache.capacity {
            cache.answers.clear();
        }
        let key = if widest_prefix <= block.1 {
            block
        } else {
            exact
        };
        cache.answers.insert(key, answer.clone());
        answer
    }

    /// `enrich` through a cache: fills `peer.location` and
    /// `peer.autonomous_system` of an event that has a peer address.
    pub fn enrich_cached(&self, event: &mut Event, cache: &mut GeoCache) {
        let Some(peer) = event.unmapped.peer.as_mut() else {
            return;
        };
        let Ok(ip) = peer.ip.parse::<IpAddr>() else {
            return;
        };
        let (location, asn) = self.lookup_cached(ip, cache);
        if location.is_some() {
            peer.location = location;
        }
        if asn.is_some() {
            peer.autonomous_system = asn;
        }
    }
}

/// Test databases, built here rather than copied from anyone: documentation
/// and loopback ranges only. `fixtures/geo/README.md` lists the mapping.
#[cfg(test)]
pub(crate) mod test_dbs {
    use std::path::Path;

    use mmdb_writer::{Value, Writer, ipnet::IpNet};
    use serde_json::json;

    /// (network, country, city, ASN, organization)
    pub const NETWORKS: &[(&str, &str, &str, u32, &str)] = &[
        ("127.0.0.0/25", "DE", "Berlin", 64500, "Example Loopback DE"),
        (
            "127.0.0.128/25",
            "FR",
            "Paris",
            64501,
            "Example Loopback FR",
        ),
        (
            "192.0.2.0/24",
            "US",
            "Springfield",
            64496,
            "Documentation Net 1",
        ),
        (
            "198.51.100.0/24",
            "JP",
            "Tokyo",
            64497,
            "Documentation Net 2",
        ),
    ];

    pub fn write(
        dir: &Path,
        country_of_high_half: &str,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let mut city = Writer::new("GeoLite2-City");
        let mut asn = Writer::new("GeoLite2-ASN");
        for (net_text, country, name, number, org) in NETWORKS {
            let net: IpNet = net_text.parse().unwrap();
            let country = if *net_text == "127.0.0.128/25" {
                country_of_high_half
            } else {
                country
            };
            city.insert(
                net,
                &json!({"country": {"iso_code": country}, "city": {"names": {"en": name}}}),
            )
            .unwrap();
            // GeoLite2-ASN stores the number as uint32.
            asn.insert_value(
                net,
                Value::map([
                    ("autonomous_system_number", Value::from(*number)),
                    ("autonomous_system_organization", Value::from(*org)),
                ]),
            )
            .unwrap();
        }
        let c = dir.join("city.mmdb");
        let a = dir.join("asn.mmdb");
        std::fs::write(&c, city.to_bytes().unwrap()).unwrap();
        std::fs::write(&a, asn.to_bytes().unwrap()).unwrap();
        (c, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{NetworkEndpoint, tests_support::key_use_event};

    /// `fixtures/geo/` holds the databases the sensor's live tests use,
    /// written by `test_dbs::write` (`KEYWARDEN_WRITE_GEO_FIXTURES=1 cargo
    /// test -p keywarden-analyzer fixture_databases` rewrites them). The
    /// committed files must answer exactly as the table says.
    #[test]
    fn fixture_databases_match_the_table() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/geo");
        if std::env::var_os("KEYWARDEN_WRITE_GEO_FIXTURES").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            test_dbs::write(&dir, "FR");
        }
        let geo = Geo::open(Some(&dir.join("city.mmdb")), Some(&dir.join("asn.mmdb"))).unwrap();
        for (net, country, city, number, org) in test_dbs::NETWORKS {
            let first: std::net::IpAddr = net.split('/').next().unwrap().parse().unwrap();
            let (loc, asn) = geo.lookup(first);
            let loc = loc.unwrap_or_else(|| panic!("{net} has no location"));
            assert_eq!(loc.country.as_deref(), Some(*country), "{net}");
            assert_eq!(loc.city.as_deref(), Some(*city), "{net}");
            let asn = asn.unwrap();
            assert_eq!(
                (asn.number, asn.name.as_deref()),
                (*number, Some(*org)),
                "{net}"
            );
        }
        assert_eq!(geo.lookup("10.0.0.1".parse().unwrap()), (None, None));
    }

    /// Real City records carry much more than the two fields events use
    /// (names in many languages, continent, subdivisions, location); those
    /// are skipped, and a Country database (no city) still gives the
    /// country.
    #[test]
    fn reads_country_and_english_city_name_from_full_records() {
        use mmdb_writer::{Writer, ipnet::IpNet};
        let dir = std::env::temp_dir().join(format!("kw-geo-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut city = Writer::new("GeoIP2-City");
        let net: IpNet = "192.0.2.0/24".parse().unwrap();
        city.insert(
            net,
            &serde_json::json!({
                "continent": {"code": "EU", "geoname_id": 6255148, "names": {"de": "Europa", "en": "Europe"}},
                "country": {"geoname_id": 2921044, "iso_code": "DE", "names": {"de": "Deutschland", "en": "Germany", "ja": "ドイツ連邦共和国"}},
                "city": {"geoname_id": 2950159, "names": {"de": "Berlin", "en": "Berlin", "ru": "Берлин"}},
                "subdivisions": [{"iso_code": "BE", "names": {"en": "Land Berlin"}}],
                "location": {"latitude": 52.5, "longitude": 13.4, "time_zone": "Europe/Berlin"},
            }),
        )
        .unwrap();
        let path = dir.join("full.mmdb");
        std::fs::write(&path, city.to_bytes().unwrap()).unwrap();
        let mut country = Writer::new("GeoLite2-Country");
        country
            .insert(
                net,
                &serde_json::json!({"country": {"iso_code": "DE", "names": {"en": "Germany"}}}),
            )
            .unwrap();
        let country_path = dir.join("country.mmdb");
        std::fs::write(&country_path, country.to_bytes().unwrap()).unwrap();

        let ip = "192.0.2.9".parse().unwrap();
        let (loc, _) = Geo::open(Some(&path), None).unwrap().lookup(ip);
        let loc = loc.unwrap();
        assert_eq!(
            (loc.country.as_deref(), loc.city.as_deref()),
            (Some("DE"), Some("Berlin"))
        );
        let (loc, _) = Geo::open(Some(&country_path), None).unwrap().lookup(ip);
        let loc = loc.unwrap();
        assert_eq!(
            (loc.country.as_deref(), loc.city.as_deref()),
            (Some("DE"), None)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The test databases (FR for 127.0.0.128/25) in a fresh directory,
    /// opened: the directory, the City file, and the `Geo`.
    fn fresh_geo(tag: &str) -> (std::path::PathBuf, std::path::PathBuf, Geo) {
        let dir = std::env::temp_dir().join(format!("kw-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (city, asn) = test_dbs::write(&dir, "FR");
        let geo = Geo::open(Some(&city), Some(&asn)).unwrap();
        (dir, city, geo)
    }

    #[test]
    fn the_cache_answers_as_the_databases_do_and_follows_reloads() {
        let (dir, city, geo) = fresh_geo("geo-cache");
        let mut view = None;
        geo.refresh_view(&mut view);
        let view = view.unwrap();
        let mut cache = GeoCache::new(4);
        // 127.0.0.0/24 is two /25 networks: filed by /24, the second
        // address would get the first one's answer.
        let ips = [
            "127.0.0.1",
            "127.0.0.200",
            "127.0.0.2",
            "127.0.0.129",
            "198.51.100.7",
            "198.51.100.8",
            "192.0.2.1",
            "10.1.2.3",
            "10.1.2.4",
            "2001:db8::1",
        ];
        for round in 0..3 {
            for ip in ips {
                let ip: IpAddr = ip.parse().unwrap();
                assert_eq!(
                    view.lookup_cached(ip, &mut cache),
                    view.lookup(ip),
                    "{ip}, round {round}"
                );
                assert!(cache.len() <= 4);
            }
        }
        // Answers from a wide network are shared across its /24.
        let mut wide = GeoCache::new(100);
        view.lookup_cached("198.51.100.7".parse().unwrap(), &mut wide);
        view.lookup_cached("198.51.100.8".parse().unwrap(), &mut wide);
        view.lookup_cached("127.0.0.1".parse().unwrap(), &mut wide);
        view.lookup_cached("127.0.0.2".parse().unwrap(), &mut wide);
        assert_eq!(wide.len(), 3, "one /24 entry, two exact ones");

        // A reloaded database empties the cache of a view that follows it.
        let other = dir.join("next");
        std::fs::create_dir_all(&other).unwrap();
        let (new_city, _) = test_dbs::write(&other, "JP");
        std::fs::rename(&new_city, &city).unwrap();
        assert!(matches!(geo.refresh()[0], Ok(true)));
        let mut view = Some(view);
        geo.refresh_view(&mut view);
        let (loc, _) = view
            .unwrap()
            .lookup_cached("127.0.0.200".parse().unwrap(), &mut wide);
        assert_eq!(loc.unwrap().country.as_deref(), Some("JP"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn looks_up_and_enriches_and_reloads_replaced_files() {
        let (dir, city, geo) = fresh_geo("geo");
        let (loc, a) = geo.lookup("127.0.0.200".parse().unwrap());
        assert_eq!(loc.unwrap().country.as_deref(), Some("FR"));
        assert_eq!(a.unwrap().number, 64501);
        let (loc, a) = geo.lookup("198.51.100.7".parse().unwrap());
        assert_eq!(loc.as_ref().unwrap().city.as_deref(), Some("Tokyo"));
        assert_eq!(a.unwrap().name.as_deref(), Some("Documentation Net 2"));
        assert_eq!(geo.lookup("10.1.2.3".parse().unwrap()), (None, None));

        let mut ev = key_use_event();
        ev.unmapped.peer = Some(NetworkEndpoint {
            ip: "127.0.0.5".into(),
            port: Some(443),
            ..Default::default()
        });
        geo.enrich(&mut ev);
        let peer = ev.unmapped.peer.unwrap();
        assert_eq!(peer.location.unwrap().country.as_deref(), Some("DE"));
        assert_eq!(peer.autonomous_system.unwrap().number, 64500);

        // Replace the city database (write elsewhere, rename over it).
        let mut view = None;
        geo.refresh_view(&mut view);
        assert!(geo.refresh().iter().all(|r| matches!(r, Ok(false))));
        let other = dir.join("next");
        std::fs::create_dir_all(&other).unwrap();
        let (new_city, _) = test_dbs::write(&other, "JP");
        std::fs::rename(&new_city, &city).unwrap();
        let stale = view
            .as_ref()
            .unwrap()
            .lookup("127.0.0.200".parse().unwrap());
        assert_eq!(stale.0.unwrap().country.as_deref(), Some("FR"));
        assert!(matches!(geo.refresh()[0], Ok(true)));
        let (loc, _) = geo.lookup("127.0.0.200".parse().unwrap());
        assert_eq!(loc.unwrap().country.as_deref(), Some("JP"));
        // A shard's view follows the reload.
        geo.refresh_view(&mut view);
        let (loc, _) = view
            .as_ref()
            .unwrap()
            .lookup("127.0.0.200".parse().unwrap());
        assert_eq!(loc.unwrap().country.as_deref(), Some("JP"));

        // A corrupt replacement keeps the old data and says why.
        std::fs::write(&city, b"not a database").unwrap();
        let r = geo.refresh();
        let e = r[0].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("city.mmdb") && e.contains("not a MaxMind database"),
            "{e}"
        );
        let (loc, _) = geo.lookup("127.0.0.200".parse().unwrap());
        assert_eq!(loc.unwrap().country.as_deref(), Some("JP"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
