//! Configuration: defaults < `dangjian.toml` < `DANGJIAN_*` environment < command-line flags.
//! Every key is known; an unknown or malformed one stops the server with its name.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// A value that must never reach a log line or an API response.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The keys of `dangjian.toml`; the same names, upper-cased with a `DANGJIAN_` prefix, in the
/// environment.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub http: Option<String>,
    pub data: Option<PathBuf>,
    pub database_url: Option<Secret>,
    pub storage_url: Option<String>,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<Secret>,
    pub token_key: Option<Secret>,
    pub admin_password: Option<Secret>,
    pub secure_cookies: Option<bool>,
    pub log_format: Option<String>,
    pub rtc_udp: Option<String>,
    pub rtc_public_ip: Option<String>,
    /// ICE-TCP listen address (default: the UDP address, on TCP), or "off".
    pub rtc_tcp: Option<String>,
    /// STUN/TURN servers handed to browsers (TOML array of tables; JSON in the environment).
    pub ice_servers: Option<Vec<IceServerConfig>>,
    /// How long new recordings are kept, e.g. `365d` (default: `forever`).
    pub recording_retention: Option<String>,
}

/// One STUN or TURN server for clients, e.g. `{ urls = ["turn:turn.example:3478"], username = "u", credential = "p" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceServerConfig {
    pub urls: Vec<String>,
    pub username: Option<String>,
    pub credential: Option<Secret>,
}

const ENV_KEYS: &[&str] = &[
    "http",
    "data",
    "database_url",
    "storage_url",
    "s3_access_key_id",
    "s3_secret_access_key",
    "token_key",
    "admin_password",
    "secure_cookies",
    "log_format",
    "rtc_udp",
    "rtc_public_ip",
    "rtc_tcp",
    "ice_servers",
    "recording_retention",
];

/// Environment variables with our prefix that are not configuration keys.
const ENV_OTHER: &[&str] = &["DANGJIAN_CONFIG", "DANGJIAN_LOG"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: Secret,
    pub storage_url: Option<String>,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<Secret>,
    pub token_key: Option<Secret>,
    pub admin_password: Option<Secret>,
    pub secure_cookies: bool,
    pub log_format: LogFormat,
    /// The one UDP socket all media peers share.
    pub rtc_udp: SocketAddr,
    /// The address clients are told to send media to (NAT 1:1, or the host's address when the
    /// socket listens on all interfaces).
    pub rtc_public_ip: Option<IpAddr>,
    /// The ICE-TCP fallback listener, if any.
    pub rtc_tcp: Option<SocketAddr>,
    pub ice_servers: Vec<IceServerConfig>,
    /// New recordings expire this long after they start (`None`: kept until deleted).
    pub recording_retention: Option<std::time::Duration>,
}

impl Layer {
    /// Reads `path`; a missing default file is fine, a missing named one is not.
    pub fn from_file(path: &Path, required: bool) -> anyhow::Result<Layer> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Layer::default());
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read config file {}", path.display()));
            }
        };
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {}", path.display(), e.message()))
            .with_context(|| format!("invalid configuration in {}", path.display()))
    }

    /// `DANGJIAN_*` variables (and `DATABASE_URL`). Unknown `DANGJIAN_` names are errors.
    pub fn from_env(vars: impl Iterator<Item = (String, String)>) -> anyhow::Result<Layer> {
        let mut table = toml::Table::new();
        for (name, value) in vars {
            let key = if name == "DATABASE_URL" {
                "database_url".to_string()
            } else if let Some(rest) = name.strip_prefix("DANGJIAN_") {
                if ENV_OTHER.contains(&name.as_str()) {
                    continue;
                }
                let key = rest.to_lowercase();
                if !ENV_KEYS.contains(&key.as_str()) {
                    bail!(
                        "unknown configuration key `{name}` in the environment (known: {})",
                        env_names()
                    );
                }
                key
            } else {
                continue;
            };
            let v = if key == "ice_servers" {
                let json: serde_json::Value = serde_json::from_str(&value)
                    .with_context(|| format!("`{name}` must be a JSON array of servers"))?;
                toml::Value::try_from(json)
                    .with_context(|| format!("`{name}` must be a JSON array of servers"))?
            } else if key == "secure_cookies" {
                toml::Value::Boolean(
                    parse_bool(&value)
                        .with_context(|| format!("`{name}` must be true or false"))?,
                )
            } else {
                toml::Value::String(value)
            };
            // DANGJIAN_DATABASE_URL wins over the generic DATABASE_URL.
            if name == "DATABASE_URL" && table.contains_key(&key) {
                continue;
            }
            table.insert(key, v);
        }
        Layer::deserialize(toml::Value::Table(table))
            .context("invalid configuration in the environment")
    }

    /// Fields set in `over` replace those in `self`.
    pub fn merge(self, over: Layer) -> Layer {
        Layer {
            http: over.http.or(self.http),
            data: over.data.or(self.data),
            database_url: over.database_url.or(self.database_url),
            storage_url: over.storage_url.or(self.storage_url),
            s3_access_key_id: over.s3_access_key_id.or(self.s3_access_key_id),
            s3_secret_access_key: over.s3_secret_access_key.or(self.s3_secret_access_key),
            token_key: over.token_key.or(self.token_key),
            admin_password: over.admin_password.or(self.admin_password),
            secure_cookies: over.secure_cookies.or(self.secure_cookies),
            log_format: over.log_format.or(self.log_format),
            rtc_udp: over.rtc_udp.or(self.rtc_udp),
            rtc_public_ip: over.rtc_public_ip.or(self.rtc_public_ip),
            ice_servers: over.ice_servers.or(self.ice_servers),
            rtc_tcp: over.rtc_tcp.or(self.rtc_tcp),
            recording_retention: over.recording_retention.or(self.recording_retention),
        }
    }

    pub fn resolve(self) -> anyhow::Result<Config> {
        let http = self.http.as_deref().unwrap_or("127.0.0.1:8080");
        let http: SocketAddr = http.parse().map_err(|_| {
            anyhow::anyhow!(
                "configuration key `http`: `{http}` is not an address like 127.0.0.1:8080"
            )
        })?;
        let data_dir = self.data.unwrap_or_else(|| PathBuf::from("data"));
        let database_url = match self.database_url {
            Some(u) => {
                let s = u.expose();
                if !(s.starts_with("sqlite:")
                    || s.starts_with("postgres://")
                    || s.starts_with("postgresql://"))
                {
                    bail!(
                        "configuration key `database_url`: use sqlite:PATH or postgres://USER@HOST/DB"
                    );
                }
                u
            }
            None => Secret::new(format!(
                "sqlite://{}?mode=rwc",
                data_dir.join("dangjian.db").display()
            )),
        };
        if let Some(u) = &self.storage_url
            && !u.starts_with("s3://")
        {
            bail!(
                "configuration key `storage_url`: use s3://BUCKET?endpoint=URL&region=REGION (local disk is the default)"
            );
        }
        if let Some(k) = &self.token_key
            && signaling::token::TokenKey::from_hex(k.expose()).is_err()
        {
            bail!("configuration key `token_key`: must be at least 64 hex digits (32 bytes)");
        }
        if let Some(p) = &self.admin_password
            && p.expose().chars().count() < 8
        {
            bail!("configuration key `admin_password`: must be at least 8 characters");
        }
        let log_format = match self.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => bail!("configuration key `log_format`: `{other}` is not text or json"),
        };
        let rtc_udp = self.rtc_udp.as_deref().unwrap_or("0.0.0.0:7882");
        let rtc_udp: SocketAddr = rtc_udp.parse().map_err(|_| {
            anyhow::anyhow!(
                "configuration key `rtc_udp`: `{rtc_udp}` is not an address like 0.0.0.0:7882"
            )
        })?;
        let rtc_tcp = match self.rtc_tcp.as_deref() {
            None => Some(rtc_udp),
            Some("off") => None,
            Some(s) => Some(s.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!("configuration key `rtc_tcp`: `{s}` is not an address like 0.0.0.0:7882 (or \"off\")")
            })?),
        };
        let ice_servers = self.ice_servers.unwrap_or_default();
        for s in &ice_servers {
            let ok = !s.urls.is_empty()
                && s.urls.iter().all(|u| {
                    ["stun:", "turn:", "turns:"]
                        .iter()
                        .any(|p| u.starts_with(p))
                });
            if !ok {
                bail!(
                    "configuration key `ice_servers`: each server needs urls starting with stun:, turn: or turns:"
                );
            }
        }
        let recording_retention = match self.recording_retention.as_deref() {
            None | Some("forever") => None,
            Some(s) => Some(humantime::parse_duration(s).map_err(|_| {
                anyhow::anyhow!(
                    "configuration key `recording_retention`: `{s}` is not a duration like 365d (or \"forever\")"
                )
            })?),
        };
        let rtc_public_ip = match self.rtc_public_ip.as_deref() {
            None => None,
            Some(s) => Some(s.parse::<IpAddr>().map_err(|_| {
                anyhow::anyhow!("configuration key `rtc_public_ip`: `{s}` is not an IP address")
            })?),
        };
        Ok(Config {
            http,
            data_dir,
            database_url,
            storage_url: self.storage_url,
            s3_access_key_id: self.s3_access_key_id,
            s3_secret_access_key: self.s3_secret_access_key,
            token_key: self.token_key,
            admin_password: self.admin_password,
            secure_cookies: self.secure_cookies.unwrap_or(false),
            log_format,
            rtc_udp,
            rtc_public_ip,
            rtc_tcp,
            ice_servers,
            recording_retention,
        })
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn env_names() -> String {
    ENV_KEYS
        .iter()
        .map(|k| format!("DANGJIAN_{}", k.to_uppercase()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> anyhow::Result<Layer> {
        Layer::from_env(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn layers_override_in_order() {
        let file: Layer = toml::from_str("http = \"127.0.0.1:1\"\ndata = \"/a\"").unwrap();
        let from_env = env(&[("DANGJIAN_DATA", "/b"), ("HOME", "/root")]).unwrap();
        let flags = Layer {
            http: Some("127.0.0.1:3".into()),
            ..Layer::default()
        };
        let c = file.merge(from_env).merge(flags).resolve().unwrap();
        assert_eq!(c.http.port(), 3);
        assert_eq!(c.data_dir, PathBuf::from("/b"));
        assert!(
            c.database_url
                .expose()
                .starts_with("sqlite:///b/dangjian.db")
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = toml::from_str::<Layer>("htp = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("htp"), "{err}");
        let err = env(&[("DANGJIAN_HTPP", "x")]).unwrap_err().to_string();
        assert!(err.contains("DANGJIAN_HTPP"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |l: Layer| l.resolve().unwrap_err().to_string();
        assert!(
            bad(Layer {
                http: Some("nowhere".into()),
                ..Default::default()
            })
            .contains("`http`")
        );
        assert!(
            bad(Layer {
                token_key: Some(Secret::new("abc")),
                ..Default::default()
            })
            .contains("token_key")
        );
        assert!(
            bad(Layer {
                database_url: Some(Secret::new("mysql://x")),
                ..Default::default()
            })
            .contains("database_url")
        );
        assert!(env(&[("DANGJIAN_SECURE_COOKIES", "maybe")]).is_err());
        assert!(
            bad(Layer {
                recording_retention: Some("a year".into()),
                ..Default::default()
            })
            .contains("recording_retention")
        );
    }

    #[test]
    fn recording_retention_is_a_duration_or_forever() {
        let with = |s: &str| {
            Layer {
                recording_retention: Some(s.into()),
                ..Default::default()
            }
            .resolve()
            .unwrap()
            .recording_retention
        };
        assert_eq!(with("forever"), None);
        assert_eq!(
            with("30d"),
            Some(std::time::Duration::from_secs(30 * 86400))
        );
    }

    #[test]
    fn ice_servers_come_from_toml_or_json_and_are_checked() {
        let file: Layer = toml::from_str(
            "[[ice_servers]]\nurls = [\"turn:127.0.0.1:3478\"]\nusername = \"u\"\ncredential = \"turnpw\"\n",
        )
        .unwrap();
        let c = file.resolve().unwrap();
        assert_eq!(c.ice_servers[0].urls, ["turn:127.0.0.1:3478"]);
        assert!(
            !format!("{c:?}").contains("turnpw"),
            "TURN credentials are secrets"
        );
        let from_env = env(&[(
            "DANGJIAN_ICE_SERVERS",
            r#"[{"urls":["stun:127.0.0.1:3478"]}]"#,
        )])
        .unwrap();
        assert_eq!(from_env.resolve().unwrap().ice_servers.len(), 1);
        assert!(env(&[("DANGJIAN_ICE_SERVERS", "not json")]).is_err());
        let bad = env(&[("DANGJIAN_ICE_SERVERS", r#"[{"urls":["http://x"]}]"#)]).unwrap();
        assert!(
            bad.resolve()
                .unwrap_err()
                .to_string()
                .contains("ice_servers")
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Layer {
            admin_password: Some(Secret::new("hunter2hunter2")),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
