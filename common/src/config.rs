//! Configuration: defaults, then a TOML file, then the command line.
//!
//! Every config struct derives `Deserialize` with `#[serde(default, deny_unknown_fields)]`, so a
//! typo in a file is an error that names the key, never a silently ignored setting. Command-line
//! overrides are applied by the binary after [`load`] returns ([`override_with!`](crate::override_with)).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Applies command-line overrides to a loaded configuration: each `value => place` sets `place`
/// to what the `Option` `value` holds, if it holds something.
///
/// ```
/// # struct Cfg { host: String, port: u16 }
/// # let mut cfg = Cfg { host: "a1".into(), port: 1 };
/// let (host, port): (Option<String>, Option<u16>) = (None, Some(4433));
/// viola_common::override_with! {
///     host => cfg.host,
///     port => cfg.port,
/// }
/// assert_eq!((cfg.host.as_str(), cfg.port), ("a1", 4433));
/// ```
#[macro_export]
macro_rules! override_with {
    ($($value:expr => $place:expr),+ $(,)?) => {
        $(
            if let Some(v) = $value {
                $place = v;
            }
        )+
    };
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration in {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// Loads `T` from its defaults, overlaid by the TOML file at `path` if one is given.
///
/// Keys missing from the file keep their defaults (the struct must use `#[serde(default)]`);
/// unknown keys are rejected (the struct must use `#[serde(deny_unknown_fields)]`).
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Parses `T` from TOML text (defaults for missing keys, unknown keys rejected by `T`).
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, toml::de::Error> {
    toml::from_str(text)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        listen: String,
        peers: Vec<String>,
    }

    impl Default for Sample {
        fn default() -> Self {
            Self {
                listen: "0.0.0.0:4433".into(),
                peers: Vec::new(),
            }
        }
    }

    #[test]
    fn missing_file_is_a_read_error_naming_the_path() {
        let err = load::<Sample>(Some(Path::new("/nonexistent/viola.toml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/viola.toml"), "{err}");
    }

    #[test]
    fn file_overrides_defaults_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "peers = [\"198.18.1.11:4433\"]\n").unwrap();
        let cfg: Sample = load(Some(&path)).unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:4433");
        assert_eq!(cfg.peers, vec!["198.18.1.11:4433".to_string()]);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = parse::<Sample>("lisen = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn no_file_gives_defaults() {
        assert_eq!(load::<Sample>(None).unwrap(), Sample::default());
    }
}
