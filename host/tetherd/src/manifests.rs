//! Reading Kubernetes manifests (YAML, one or more documents per file) as JSON values: the one
//! place files become documents, for every reader of manifests (the daemon's IPPool files, its
//! workload directory, and `tetherd policy test`'s pod and owner-object files).

use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

/// A manifest file that cannot be used.
#[derive(Debug, Error)]
pub enum ManifestFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: document {index} is not valid YAML: {source}")]
    Yaml {
        path: PathBuf,
        index: usize,
        source: yaml_serde::Error,
    },
    #[error("{path}: document {index}: {source}")]
    Object {
        path: PathBuf,
        index: usize,
        source: tether_core::manifest::ManifestError,
    },
    #[error("{path}: no Pod in the file")]
    NoPod { path: PathBuf },
}

/// The manifest files (.yaml, .yml, .json) of `dir`, sorted; hidden files (editors' and
/// atomic writers' temporaries) are left out. `recursive` descends into subdirectories.
pub fn manifest_files(dir: &Path, recursive: bool) -> std::io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if entry.file_type()?.is_dir() {
                if recursive {
                    walk(&path, recursive, out)?;
                }
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, recursive, &mut out)?;
    out.sort();
    Ok(out)
}

/// Every non-empty document of a file, as JSON values. A `kind: List` is flattened.
pub fn read_documents(path: &Path) -> Result<Vec<Value>, ManifestFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    tether_core::manifest::documents(&text).map_err(|(index, source)| ManifestFileError::Yaml {
        path: path.to_owned(),
        index,
        source,
    })
}

/// The first Pod of a file.
pub fn read_pod(path: &Path) -> Result<tether_core::Workload, ManifestFileError> {
    for (index, doc) in read_documents(path)?.iter().enumerate() {
        if doc.get("kind").and_then(Value::as_str) == Some("Pod") {
            return tether_core::manifest::workload_from_pod(doc).map_err(|source| {
                ManifestFileError::Object {
                    path: path.to_owned(),
                    index,
                    source,
                }
            });
        }
    }
    Err(ManifestFileError::NoPod {
        path: path.to_owned(),
    })
}

/// Every object of the files, for owner-chain resolution.
pub fn read_objects(
    paths: &[PathBuf],
) -> Result<tether_core::manifest::ObjectIndex, ManifestFileError> {
    let mut index = tether_core::manifest::ObjectIndex::new();
    for path in paths {
        for (i, doc) in read_documents(path)?.iter().enumerate() {
            let o = tether_core::manifest::object_from_value(doc).map_err(|source| {
                ManifestFileError::Object {
                    path: path.clone(),
                    index: i,
                    source,
                }
            })?;
            index.insert(o);
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.yaml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn documents_of_a_stream() {
        let (_d, path) = file(
            "# pools\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {on: yes, n: 3}}\n\
             ---\n---\n# only a comment\n---\nkind: List\nitems:\n- {kind: Namespace}\n- {kind: Pod}\n\
             ...\n---\n{\"kind\": \"Service\"}\n",
        );
        let docs = read_documents(&path).expect("reads");
        assert_eq!(
            docs,
            vec![
                json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "a", "labels": {"on": "yes", "n": 3}}}),
                json!({"kind": "Namespace"}),
                json!({"kind": "Pod"}),
                json!({"kind": "Service"}),
            ]
        );
        let (_d, empty) = file("");
        assert_eq!(read_documents(&empty).expect("empty"), Vec::<Value>::new());
    }

    #[test]
    fn errors_name_file_and_document() {
        let (_d, path) = file("kind: Pod\n---\nkind: [unclosed\n");
        let e = read_documents(&path).expect_err("bad yaml");
        assert!(
            matches!(e, ManifestFileError::Yaml { index: 1, .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().starts_with(&format!(
                "{}: document 1 is not valid YAML: ",
                path.display()
            )),
            "{e}"
        );
        let e = read_documents(Path::new("/nonexistent/x.yaml")).expect_err("missing");
        assert!(
            e.to_string().starts_with("reading /nonexistent/x.yaml: "),
            "{e}"
        );
    }
}
