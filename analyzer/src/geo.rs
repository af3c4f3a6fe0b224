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
    sync::{Arc, RwLock},
};

use maxminddb::{Reader, geoip2};

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
}

impl Geo {
    /// Opens the databases. `city` is a City or Country database, `asn` an
    /// ASN or ISP one.
    pub fn open(city: Option<&Path>, asn: Option<&Path>) -> Result<Self, GeoError> {
        Ok(Geo {
            city: city.map(Db::open).transpose()?,
            asn: asn.map(Db::open).transpose()?,
        })
    }

    /// Reloads replaced files. Errors leave the previous data in use.
    pub fn refresh(&self) -> Vec<Result<bool, GeoError>> {
        [&self.city, &self.asn]
            .into_iter()
            .flatten()
            .map(Db::refresh)
            .collect()
    }

    /// Where an address is, and whose network it is in.
    pub fn lookup(&self, ip: IpAddr) -> (Option<Location>, Option<AutonomousSystem>) {
        let location = self.city.as_ref().and_then(Db::reader).and_then(|r| {
            let city: geoip2::City = r.lookup(ip).ok()?.decode().ok()??;
            let loc = Location {
                country: city.country.iso_code.map(str::to_owned),
                city: city.city.names.english.map(str::to_owned),
            };
            (loc.country.is_some() || loc.city.is_some()).then_some(loc)
        });
        let asn = self.asn.as_ref().and_then(Db::reader).and_then(|r| {
            let a: geoip2::Asn = r.lookup(ip).ok()?.decode().ok()??;
            Some(AutonomousSystem {
                number: a.autonomous_system_number?,
                name: a.autonomous_system_organization.map(str::to_owned),
            })
        });
        (location, asn)
    }

    /// Fills `peer.location` and `peer.autonomous_system` of an event that
    /// has a peer address.
    pub fn enrich(&self, event: &mut Event) {
        let Some(peer) = event.peer.as_mut() else {
            return;
        };
        let Ok(ip) = peer.ip.parse::<IpAddr>() else {
            return;
        };
        let (location, asn) = self.lookup(ip);
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

    #[test]
    fn looks_up_and_enriches_and_reloads_replaced_files() {
        let dir = std::env::temp_dir().join(format!("kw-geo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (city, asn) = test_dbs::write(&dir, "FR");
        let geo = Geo::open(Some(&city), Some(&asn)).unwrap();
        let (loc, a) = geo.lookup("127.0.0.200".parse().unwrap());
        assert_eq!(loc.unwrap().country.as_deref(), Some("FR"));
        assert_eq!(a.unwrap().number, 64501);
        let (loc, a) = geo.lookup("198.51.100.7".parse().unwrap());
        assert_eq!(loc.as_ref().unwrap().city.as_deref(), Some("Tokyo"));
        assert_eq!(a.unwrap().name.as_deref(), Some("Documentation Net 2"));
        assert_eq!(geo.lookup("10.1.2.3".parse().unwrap()), (None, None));

        let mut ev = key_use_event();
        ev.peer = Some(NetworkEndpoint {
            ip: "127.0.0.5".into(),
            port: Some(443),
            ..Default::default()
        });
        geo.enrich(&mut ev);
        let peer = ev.peer.unwrap();
        assert_eq!(peer.location.unwrap().country.as_deref(), Some("DE"));
        assert_eq!(peer.autonomous_system.unwrap().number, 64500);

        // Replace the city database (write elsewhere, rename over it).
        assert!(geo.refresh().iter().all(|r| matches!(r, Ok(false))));
        let other = dir.join("next");
        std::fs::create_dir_all(&other).unwrap();
        let (new_city, _) = test_dbs::write(&other, "JP");
        std::fs::rename(&new_city, &city).unwrap();
        assert!(matches!(geo.refresh()[0], Ok(true)));
        let (loc, _) = geo.lookup("127.0.0.200".parse().unwrap());
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
