//! The management plane's configuration (`[management]`) and the role →
//! permission table (`[rbac.roles.NAME]`: the built-in `admin` and `user`
//! reconfigured, or roles of the operator's own).
//!
//! The management plane exists only when the file has a `[management]`
//! table: a server that was not asked for a management API has no
//! listener for one (the smallest attack surface by default, and existing
//! deployments keep exactly the ports they had).

use super::access::{PlaneAccess, RawTls, plane_access};
use super::{ConfigError, invalid};
use moat_guard::Role;
use moat_guard::rbac::{Permission, Rbac, RoleSpec};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_MANAGEMENT_LISTEN: &str = "127.0.0.1:8081";

/// `[management]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManagement {
    pub listen: Option<String>,
    pub allow_cidrs: Option<Vec<String>>,
    pub tls: Option<RawTls>,
    pub public_routes: Option<Vec<String>>,
    pub model_control: Option<String>,
    pub totp_file: Option<PathBuf>,
}

/// Whether the model set may change at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelControl {
    /// Models are fixed at start; management writes answer 405.
    None,
    /// `POST /models`, `PUT/DELETE /models/{name}` are served.
    Explicit,
}

/// The management plane, validated.
#[derive(Debug, Clone)]
pub struct ManagementConfig {
    pub listen: SocketAddr,
    pub access: PlaneAccess,
    pub public_routes: Vec<String>,
    pub model_control: ModelControl,
    /// TOTP enrolments (`moat keys totp enroll` writes them).
    pub totp_file: PathBuf,
}

impl RawManagement {
    pub fn validate(self, home: &Path) -> Result<ManagementConfig, ConfigError> {
        let s = self
            .listen
            .unwrap_or_else(|| DEFAULT_MANAGEMENT_LISTEN.to_owned());
        let listen = s.parse().map_err(|_| {
            invalid(
                "management.listen",
                format!("{s:?} is not an address like {DEFAULT_MANAGEMENT_LISTEN}"),
            )
        })?;
        let public_routes = self.public_routes.unwrap_or_default();
        for (i, r) in public_routes.iter().enumerate() {
            // The management plane has no `/ready`; only its health check
            // may be public.
            if r != "/health" {
                return Err(invalid(
                    format!("management.public_routes[{i}]"),
                    format!("{r:?} cannot be public (allowed: /health)"),
                ));
            }
        }
        let model_control = match self.model_control.as_deref() {
            None | Some("none") => ModelControl::None,
            Some("explicit") => ModelControl::Explicit,
            Some(v) => {
                return Err(invalid(
                    "management.model_control",
                    format!("{v:?}: use \"none\" (default) or \"explicit\""),
                ));
            }
        };
        Ok(ManagementConfig {
            listen,
            access: plane_access("management", self.allow_cidrs, self.tls)?,
            public_routes,
            model_control,
            totp_file: self.totp_file.unwrap_or_else(|| home.join("totp.json")),
        })
    }
}

/// `[rbac]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRbac {
    #[serde(default)]
    pub roles: BTreeMap<String, RawRole>,
}

/// `[rbac.roles.NAME]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRole {
    pub permissions: Option<Vec<String>>,
    pub totp_required: Option<bool>,
}

impl RawRbac {
    /// The built-in table with each configured role replaced or added. A
    /// built-in given without `permissions` keeps its built-in set (so
    /// `totp_required` alone can be switched on); a role of the operator's
    /// own must list its permissions (an empty list is allowed: a role
    /// that may do nothing, on purpose).
    pub fn validate(&self) -> Result<Rbac, ConfigError> {
        let mut rbac = Rbac::default();
        for (name, raw) in &self.roles {
            let key = format!("rbac.roles.{name}");
            let role = Role::new(name).map_err(|e| invalid(&key, e.to_string()))?;
            let permissions = match &raw.permissions {
                None => match rbac.get(&role) {
                    Some(built_in) => built_in.permissions.clone(),
                    None => {
                        return Err(invalid(
                            format!("{key}.permissions"),
                            "required for a role that is not built in (admin, user)",
                        ));
                    }
                },
                Some(list) => {
                    let mut out = std::collections::BTreeSet::new();
                    for (i, p) in list.iter().enumerate() {
                        let perm = Permission::parse(p).ok_or_else(|| {
                            invalid(
                                format!("{key}.permissions[{i}]"),
                                format!(
                                    "{p:?}: expected one of {}",
                                    Permission::ALL.map(Permission::as_str).join(", ")
                                ),
                            )
                        })?;
                        out.insert(perm);
                    }
                    out
                }
            };
            let spec = RoleSpec::new(permissions, raw.totp_required.unwrap_or(false));
            rbac.set(role, spec);
        }
        Ok(rbac)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use crate::config::{Config, ConfigError, RawConfig};
    use moat_guard::Role;
    use moat_guard::rbac::Permission;
    use std::path::Path;

    fn check(extra: &str) -> Result<Config, ConfigError> {
        let text = format!("[[models]]\nname = \"demo\"\n{extra}");
        RawConfig::from_toml(&text, Path::new("moat.toml"))?.validate(Some("/h".into()))
    }

    fn err(extra: &str) -> String {
        check(extra).unwrap_err().to_string()
    }

    #[test]
    fn management_is_off_unless_configured() {
        let c = check("").unwrap();
        assert!(c.management.is_none());
        let c = check("[management]\n").unwrap();
        let m = c.management.unwrap();
        assert_eq!(m.listen.to_string(), "127.0.0.1:8081");
        assert_eq!(m.model_control, super::ModelControl::None);
        assert_eq!(m.totp_file, Path::new("/h/totp.json"));
        let c =
            check("[management]\nmodel_control = \"explicit\"\nallow_cidrs = [\"10.0.0.0/8\"]\n").unwrap();
        assert_eq!(c.management.unwrap().model_control, super::ModelControl::Explicit);
    }

    #[test]
    fn bad_management_keys_are_named() {
        assert!(err("[management]\nmodel_control = \"auto\"\n").starts_with("management.model_control:"));
        assert!(err("[management]\nlisten = \"nope\"\n").starts_with("management.listen:"));
        assert!(err("[management]\nlisten = \"127.0.0.1:8080\"\n").starts_with("management.listen:"));
        assert!(
            err("[management]\npublic_routes = [\"/keys\"]\n").starts_with("management.public_routes[0]:")
        );
        assert!(err("[management]\nallow_cidrs = [\"x\"]\n").starts_with("management.allow_cidrs[0]:"));
    }

    #[test]
    fn rbac_roles_replace_the_defaults() {
        let c = check(
            "[rbac.roles.admin]\ntotp_required = true\n\
             [rbac.roles.user]\npermissions = [\"inference\", \"keys:write\"]\n",
        )
        .unwrap();
        let admin = c.rbac.role(&Role::admin());
        assert!(admin.totp_required);
        assert!(
            admin.allows(Permission::ModelsWrite),
            "permissions kept when not given"
        );
        let user = c.rbac.role(&Role::user());
        assert!(user.allows(Permission::KeysWrite));
        assert!(
            !user.allows(Permission::ModelsRead),
            "the list replaces the default"
        );
        assert!(
            err("[rbac.roles.user]\npermissions = [\"inference\", \"models:*\"]\n")
                .starts_with("rbac.roles.user.permissions[1]:")
        );
        assert!(err("[rbac.roles.user]\ntotp = true\n").contains("unknown field"));
    }

    #[test]
    fn custom_roles_are_defined_by_name() {
        let c = check(
            "[rbac.roles.ops]\npermissions = [\"models:read\", \"models:write\"]\ntotp_required = true\n\
             [rbac.roles.auditor]\npermissions = [\"audit:read\"]\n[rbac.roles.nobody]\npermissions = []\n",
        )
        .unwrap();
        let ops = c.rbac.get(&Role::new("ops").unwrap()).unwrap();
        assert!(ops.totp_required);
        assert_eq!(
            ops.permissions.iter().copied().collect::<Vec<_>>(),
            [Permission::ModelsRead, Permission::ModelsWrite]
        );
        let auditor = c.rbac.get(&Role::new("auditor").unwrap()).unwrap();
        assert!(auditor.allows(Permission::AuditRead) && !auditor.allows(Permission::Inference));
        assert!(
            c.rbac
                .get(&Role::new("nobody").unwrap())
                .unwrap()
                .permissions
                .is_empty()
        );
        // The built-ins stay, with their defaults.
        assert!(c.rbac.role(&Role::user()).allows(Permission::Inference));
        assert!(c.rbac.role(&Role::admin()).allows(Permission::KeysWrite));

        // Names are checked and the error names the key.
        for bad in ["Ops", "2x", "a.b", "ops!"] {
            let e = err(&format!("[rbac.roles.\"{bad}\"]\npermissions = []\n"));
            assert!(e.starts_with(&format!("rbac.roles.{bad}:")), "{e}");
            assert!(e.contains("lower-case letter"), "{e}");
        }
        let long = "a".repeat(33);
        assert!(
            err(&format!("[rbac.roles.{long}]\npermissions = []\n"))
                .starts_with(&format!("rbac.roles.{long}:"))
        );
        // A custom role has no built-in set to fall back on.
        assert!(err("[rbac.roles.ops]\ntotp_required = true\n").starts_with("rbac.roles.ops.permissions:"));
        assert!(
            err("[rbac.roles.ops]\npermissions = [\"inference\", \"root\"]\n")
                .starts_with("rbac.roles.ops.permissions[1]:")
        );
    }
}
