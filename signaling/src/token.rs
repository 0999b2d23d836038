//! Media access tokens: HS256 JWTs naming one room, one identity and what it may do there.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

const ISSUER: &str = "dangjian";

/// What the holder of a token may do in its room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Grants {
    pub publish: bool,
    pub subscribe: bool,
    pub data: bool,
    pub admin: bool,
    pub record: bool,
    /// Not shown to the others and not counted as present (the recorder).
    pub hidden: bool,
}

impl Grants {
    /// What an ordinary participant gets: send and receive media and chat.
    pub const PARTICIPANT: Grants = Grants {
        publish: true,
        subscribe: true,
        data: true,
        admin: false,
        record: false,
        hidden: false,
    };
}

impl FromStr for Grants {
    type Err = String;

    /// Parses a comma-separated list such as `publish,subscribe,data`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut g = Grants::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "publish" => g.publish = true,
                "subscribe" => g.subscribe = true,
                "data" => g.data = true,
                "admin" => g.admin = true,
                "record" => g.record = true,
                "hidden" => g.hidden = true,
                other => {
                    return Err(format!(
                        "unknown grant `{other}` (expected publish, subscribe, data, admin, record, hidden)"
                    ));
                }
            }
        }
        Ok(g)
    }
}

/// The payload of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The participant identity, unique within the room.
    pub sub: String,
    /// Display name shown to the others.
    #[serde(default)]
    pub name: String,
    pub room: String,
    pub grants: Grants,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

/// What to put in a new token.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub room: String,
    pub identity: String,
    pub name: String,
    pub grants: Grants,
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token invalid: {0}")]
    Invalid(String),
    #[error("token is for room `{token_room}`, not `{room}`")]
    WrongRoom { token_room: String, room: String },
    #[error("{0}")]
    BadRequest(String),
}

/// The server's signing key. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct TokenKey {
    secret: Vec<u8>,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(***)")
    }
}

impl TokenKey {
    /// Shortest secret accepted: HS256 wants at least 256 bits.
    pub const MIN_LEN: usize = 32;

    pub fn from_bytes(secret: Vec<u8>) -> Result<Self, TokenError> {
        if secret.len() < Self::MIN_LEN {
            return Err(TokenError::BadRequest(format!(
                "token key must be at least {} bytes",
                Self::MIN_LEN
            )));
        }
        Ok(Self { secret })
    }

    /// A fresh random key, as written to the data directory on first start.
    pub fn generate() -> Self {
        let secret: [u8; 32] = rand::random();
        Self {
            secret: secret.to_vec(),
        }
    }

    /// The key as stored on disk: 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.secret)
    }

    pub fn from_hex(s: &str) -> Result<Self, TokenError> {
        let bytes = hex::decode(s.trim())
            .map_err(|_| TokenError::BadRequest("token key is not hex".into()))?;
        Self::from_bytes(bytes)
    }

    pub fn mint(&self, req: &TokenRequest) -> Result<String, TokenError> {
        validate_name("room", &req.room)?;
        validate_name("identity", &req.identity)?;
        if req.ttl.is_zero() {
            return Err(TokenError::BadRequest("ttl must be positive".into()));
        }
        let now = unix_now();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: req.identity.clone(),
            name: if req.name.is_empty() {
                req.identity.clone()
            } else {
                req.name.clone()
            },
            room: req.room.clone(),
            grants: req.grants,
            iat: now,
            nbf: now,
            exp: now + req.ttl.as_secs().max(1),
        };
        let key = EncodingKey::from_secret(&self.secret)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }

    /// Checks signature, issuer and lifetime, without regard to the room.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let key = DecodingKey::from_secret(&self.secret)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
            Ok(data) => Ok(data.claims),
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => Err(TokenError::Expired),
            Err(e) => Err(TokenError::Invalid(e.to_string())),
        }
    }

    /// Checks the token and that it names `room`.
    pub fn verify_for_room(&self, token: &str, room: &str) -> Result<Claims, TokenError> {
        let claims = self.verify(token)?;
        if claims.room != room {
            return Err(TokenError::WrongRoom {
                token_room: claims.room,
                room: room.into(),
            });
        }
        Ok(claims)
    }
}

/// Room names and identities travel in URLs and logs: keep them short and printable.
pub fn validate_name(what: &str, value: &str) -> Result<(), TokenError> {
    if value.is_empty() || value.len() > 128 {
        return Err(TokenError::BadRequest(format!(
            "{what} must be 1 to 128 bytes"
        )));
    }
    if value.chars().any(|c| c.is_control() || c == '/') {
        return Err(TokenError::BadRequest(format!(
            "{what} must not contain control characters or `/`"
        )));
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(room: &str, ttl: u64) -> TokenRequest {
        TokenRequest {
            room: room.into(),
            identity: "alice".into(),
            name: "Alice".into(),
            grants: Grants::PARTICIPANT,
            ttl: Duration::from_secs(ttl),
        }
    }

    #[test]
    fn minted_token_verifies_for_its_room_only() {
        let key = TokenKey::generate();
        let token = key.mint(&req("branch-1", 60)).unwrap();
        let claims = key.verify_for_room(&token, "branch-1").unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.grants, Grants::PARTICIPANT);
        assert!(matches!(
            key.verify_for_room(&token, "branch-2"),
            Err(TokenError::WrongRoom { .. })
        ));
    }

    #[test]
    fn token_from_another_key_is_rejected() {
        let token = TokenKey::generate().mint(&req("r", 60)).unwrap();
        assert!(matches!(
            TokenKey::generate().verify(&token),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let key = TokenKey::generate();
        let token = key.mint(&req("r", 60)).unwrap();
        let mut parts: Vec<&str> = token.split('.').collect();
        let other = key.mint(&req("other", 60)).unwrap();
        let other_payload = other.split('.').nth(1).unwrap().to_string();
        parts[1] = &other_payload;
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            token.split('.').nth(2).unwrap()
        );
        assert!(matches!(key.verify(&forged), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn expired_token_is_rejected_as_expired() {
        let key = TokenKey::generate();
        let now = unix_now();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: "a".into(),
            name: "a".into(),
            room: "r".into(),
            grants: Grants::PARTICIPANT,
            iat: now - 100,
            nbf: now - 100,
            exp: now - 10,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&key.secret).unwrap(),
        )
        .unwrap();
        assert_eq!(key.verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn grants_parse_and_reject_unknown() {
        let g: Grants = "publish, subscribe,record".parse().unwrap();
        assert!(g.publish && g.subscribe && g.record && !g.admin && !g.data);
        assert!("publish,fly".parse::<Grants>().unwrap_err().contains("fly"));
    }

    #[test]
    fn bad_names_and_short_keys_are_refused() {
        let key = TokenKey::generate();
        assert!(key.mint(&req("", 60)).is_err());
        assert!(key.mint(&req("a/b", 60)).is_err());
        assert!(TokenKey::from_bytes(vec![1; 8]).is_err());
        assert_eq!(
            TokenKey::from_hex(&key.to_hex()).unwrap().secret,
            key.secret
        );
    }
}
