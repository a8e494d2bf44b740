//! The DAG of a job: indexes, dependents, cycle detection and the initial
//! ready set. Pure functions, used at submission; the store's scripts keep
//! per-task counters of unfinished dependencies derived from this plan.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

/// A job's dependency graph over task indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dag {
    /// `deps[i]`: the tasks task `i` waits for.
    pub deps: Vec<Vec<u32>>,
    /// `dependents[i]`: the tasks waiting for task `i`.
    pub dependents: Vec<Vec<u32>>,
}

/// Why a set of `after` edges is not a DAG.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DagError {
    /// Two tasks have the same name.
    #[error("tasks[{index}].name: duplicate task name {name:?}")]
    DuplicateName {
        /// The second task with the name.
        index: usize,
        /// The name.
        name: String,
    },
    /// An `after` entry names no task of the job.
    #[error("tasks[{index}].after[{position}]: unknown task {name:?}")]
    UnknownDependency {
        /// The task.
        index: usize,
        /// Position in its `after`.
        position: usize,
        /// The unknown name.
        name: String,
    },
    /// The edges contain a cycle.
    #[error("tasks: dependency cycle {}", .0.join(" -> "))]
    Cycle(Vec<String>),
}

impl DagError {
    /// The task the error is about; `None` for a cycle (the job's).
    pub fn task(&self) -> Option<usize> {
        match self {
            DagError::DuplicateName { index, .. } | DagError::UnknownDependency { index, .. } => {
                Some(*index)
            }
            DagError::Cycle(_) => None,
        }
    }
}

/// Every reason a set of `after` edges is not a DAG: each duplicate name
/// and each unknown dependency, in task order, then the first cycle found
/// among the known edges (not looked for when names are duplicated: which
/// task an `after` entry means is then unclear). Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DagErrors(pub Vec<DagError>);

impl std::fmt::Display for DagErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DagErrors {}

impl Dag {
    /// Build the graph of tasks `names` whose `after` lists are `after`.
    pub fn build<S: AsRef<str>>(names: &[S], after: &[Vec<S>]) -> Result<Dag, DagErrors> {
        let mut errors = Vec::new();
        let mut index: HashMap<&str, u32> = HashMap::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            // The first task of a name keeps it: `after` entries mean that one.
            match index.entry(name.as_ref()) {
                Entry::Occupied(_) => errors.push(DagError::DuplicateName {
                    index: i,
                    name: name.as_ref().to_owned(),
                }),
                Entry::Vacant(slot) => {
                    slot.insert(i as u32);
                }
            }
        }
        let mut deps = vec![Vec::new(); names.len()];
        let mut dependents = vec![Vec::new(); names.len()];
        let mut seen = HashSet::new();
        for (i, list) in after.iter().enumerate() {
            seen.clear();
            let mut unknown_named = false;
            for (position, dep) in list.iter().enumerate() {
                let Some(&d) = index.get(dep.as_ref()) else {
                    // A task's first unknown entry stands for the rest: a
                    // megabyte body can name 200,000 of them.
                    if !unknown_named {
                        unknown_named = true;
                        errors.push(DagError::UnknownDependency {
                            index: i,
                            position,
                            name: dep.as_ref().to_owned(),
                        });
                    }
                    continue;
                };
                // A set, not `contains`: a join after 10,000 tasks would
                // otherwise cost 50 million comparisons.
                if seen.insert(d) {
                    deps[i].push(d);
                    dependents[d as usize].push(i as u32);
                }
            }
        }
        // Task order: a task's duplicate name before its unknown deps.
        errors.sort_by_key(|e| e.task());
        let dag = Dag { deps, dependents };
        let duplicated = errors
            .iter()
            .any(|e| matches!(e, DagError::DuplicateName { .. }));
        if !duplicated && let Some(cycle) = dag.find_cycle() {
            errors.push(DagError::Cycle(
                cycle
                    .into_iter()
                    .map(|i| names[i as usize].as_ref().to_owned())
                    .collect(),
            ));
        }
        if errors.is_empty() {
            Ok(dag)
        } else {
            Err(DagErrors(errors))
        }
    }

    /// The tasks with no dependencies: ready at submission.
    pub fn roots(&self) -> Vec<u32> {
        (0..self.deps.len() as u32)
            .filter(|&i| self.deps[i as usize].is_empty())
            .collect()
    }

    /// A cycle as a closed path of indexes (first == last), if any.
    fn find_cycle(&self) -> Option<Vec<u32>> {
        // Iterative three-colour DFS along dependency edges.
        #[derive(Clone, Copy, PartialEq)]
        enum Colour {
            White,
            Grey,
            Black,
        }
        let n = self.deps.len();
        let mut colour = vec![Colour::White; n];
        for start in 0..n {
            if colour[start] != Colour::White {
                continue;
            }
            let mut stack: Vec<(u32, usize)> = vec![(start as u32, 0)];
            colour[start] = Colour::Grey;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                let edges = &self.deps[node as usize];
                if *next < edges.len() {
                    let to = edges[*next];
                    *next += 1;
                    match colour[to as usize] {
                        Colour::White => {
                            colour[to as usize] = Colour::Grey;
                            stack.push((to, 0));
                        }
                        Colour::Grey => {
                            let from = stack.iter().position(|&(n, _)| n == to).unwrap_or(0);
                            let mut cycle: Vec<u32> =
                                stack[from..].iter().map(|&(n, _)| n).collect();
                            cycle.push(to);
                            return Some(cycle);
                        }
                        Colour::Black => {}
                    }
                } else {
                    colour[node as usize] = Colour::Black;
                    stack.pop();
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The graph, or its first error.
    fn build(names: &[&str], after: &[&[&str]]) -> Result<Dag, DagError> {
        build_all(names, after).map_err(|mut e| e.0.swap_remove(0))
    }

    fn build_all(names: &[&str], after: &[&[&str]]) -> Result<Dag, DagErrors> {
        let after: Vec<Vec<&str>> = after.iter().map(|a| a.to_vec()).collect();
        Dag::build(names, &after)
    }

    #[test]
    fn diamond_has_one_root_and_fan_in() {
        let dag = build(&["a", "b", "c", "d"], &[&[], &["a"], &["a"], &["b", "c"]])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dag.roots(), vec![0]);
        assert_eq!(dag.dependents[0], vec![1, 2]);
        assert_eq!(dag.deps[3], vec![1, 2]);
    }

    #[test]
    fn a_cycle_is_named_task_by_task() {
        let err = build(&["a", "b", "c"], &[&["c"], &["a"], &["b"]]).err();
        match err {
            Some(DagError::Cycle(path)) => {
                assert_eq!(path.first(), path.last());
                assert_eq!(path.len(), 4);
            }
            other => panic!("expected a cycle, got {other:?}"),
        }
    }

    #[test]
    fn a_self_dependency_is_a_cycle() {
        assert!(matches!(build(&["a"], &[&["a"]]), Err(DagError::Cycle(_))));
    }

    #[test]
    fn an_unknown_dependency_names_task_and_position() {
        let err = build(&["a", "b"], &[&[], &["a", "zz"]]).err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("tasks[1].after[1]: unknown task \"zz\"")
        );
    }

    #[test]
    fn duplicate_names_are_rejected() {
        assert!(matches!(
            build(&["a", "a"], &[&[], &[]]),
            Err(DagError::DuplicateName { index: 1, .. })
        ));
    }

    #[test]
    fn every_duplicate_name_and_each_tasks_first_unknown_dependency_is_named_in_task_order() {
        let err = build_all(
            &["a", "b", "a", "c", "b"],
            &[&[], &["x"], &[], &["a", "y", "z"], &["b"]],
        )
        .err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some(
                "tasks[1].after[0]: unknown task \"x\"; \
                 tasks[2].name: duplicate task name \"a\"; \
                 tasks[3].after[1]: unknown task \"y\"; \
                 tasks[4].name: duplicate task name \"b\""
            )
        );
    }

    #[test]
    fn a_cycle_among_the_known_edges_is_named_after_the_unknown_ones() {
        let err = build_all(&["a", "b"], &[&["b"], &["a", "nope"]]).err();
        assert_eq!(
            err.map(|e| e.0),
            Some(vec![
                DagError::UnknownDependency {
                    index: 1,
                    position: 1,
                    name: "nope".into()
                },
                DagError::Cycle(vec!["a".into(), "b".into(), "a".into()])
            ])
        );
    }

    #[test]
    fn no_cycle_is_looked_for_while_names_are_duplicated() {
        let err = build_all(&["a", "a"], &[&["a"], &[]]).err();
        assert_eq!(
            err.map(|e| e.0),
            Some(vec![DagError::DuplicateName {
                index: 1,
                name: "a".into()
            }])
        );
    }

    proptest::proptest! {
        #[test]
        fn edges_to_earlier_tasks_never_form_a_cycle(edges in proptest::collection::vec((0u32..50, 0u32..50), 0..200)) {
            let names: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
            let mut after: Vec<Vec<String>> = vec![Vec::new(); 50];
            for (a, b) in edges {
                if a > b { after[a as usize].push(format!("t{b}")); }
            }
            let dag = Dag::build(&names, &after);
            proptest::prop_assert!(dag.is_ok());
            let dag = dag.map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            proptest::prop_assert!(dag.roots().contains(&0));
        }
    }
}
