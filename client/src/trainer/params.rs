//! Converting between model variables and [`ParameterVector`]s (the format weights travel in).

use fedtune_shared::params::{Manifest, ParameterVector, TensorSpec};
use tch::{Device, Kind, Tensor};

use crate::local_trainer::TrainerError;

/// The manifest of `vars` (names and shapes, in the given order).
pub fn manifest_of(vars: &[(String, Tensor)]) -> Manifest {
    Manifest {
        tensors: vars
            .iter()
            .map(|(name, t)| TensorSpec {
                name: name.clone(),
                shape: t.size().iter().map(|&d| d as usize).collect(),
            })
            .collect(),
    }
}

/// Copies `vars` into one f32 vector on the host, in their order.
pub fn to_parameter_vector(vars: &[(String, Tensor)]) -> Result<ParameterVector, TrainerError> {
    let manifest = manifest_of(vars);
    let mut values = Vec::with_capacity(manifest.numel());
    for (name, t) in vars {
        let flat = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view([-1]);
        let v: Vec<f32> = Vec::try_from(&flat)
            .map_err(|e| TrainerError::Failed(format!("cannot read tensor `{name}`: {e}")))?;
        values.extend_from_slice(&v);
    }
    ParameterVector::new(manifest, values).map_err(|e| TrainerError::Failed(e.to_string()))
}

/// Writes the tensors `vars` names from `source` into the variables. `source` may hold more
/// tensors, in any order; a missing tensor or a shape mismatch is [`TrainerError::Incompatible`].
pub fn load_parameter_vector(
    vars: &[(String, Tensor)],
    source: &ParameterVector,
) -> Result<(), TrainerError> {
    let wanted = manifest_of(vars);
    let picked = if source.manifest() == &wanted {
        std::borrow::Cow::Borrowed(source)
    } else {
        std::borrow::Cow::Owned(
            source.select(&wanted).map_err(|e| TrainerError::Incompatible(e.to_string()))?,
        )
    };
    picked.ensure_finite().map_err(|e| TrainerError::Incompatible(e.to_string()))?;
    tch::no_grad(|| {
        for ((_, var), (spec, range)) in vars.iter().zip(picked.manifest().ranges()) {
            let shape: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
            let src = Tensor::from_slice(&picked.values()[range]).view(shape.as_slice());
            let mut var = var.shallow_clone();
            var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vec<(String, Tensor)> {
        vec![
            ("a.weight".into(), Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2])),
            ("a.bias".into(), Tensor::from_slice(&[5.0f32, 6.0])),
        ]
    }

    #[test]
    fn variables_round_trip_through_a_parameter_vector() {
        let v = vars();
        let pv = to_parameter_vector(&v).unwrap();
        assert_eq!(pv.values(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let target = vec![
            ("a.weight".into(), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))),
            ("a.bias".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))),
        ];
        load_parameter_vector(&target, &pv).unwrap();
        assert_eq!(to_parameter_vector(&target).unwrap(), pv);
    }

    #[test]
    fn a_vector_with_the_wrong_shape_is_incompatible() {
        let pv = to_parameter_vector(&vars()).unwrap();
        let target = vec![("a.bias".to_string(), Tensor::zeros([3], (Kind::Float, Device::Cpu)))];
        assert!(matches!(load_parameter_vector(&target, &pv), Err(TrainerError::Incompatible(_))));
    }
}
