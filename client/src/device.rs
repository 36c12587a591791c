//! Choosing where the model runs: `auto`, `cpu`, `cuda` or `cuda:N`.

use std::fmt;
use std::str::FromStr;

use tch::Device;

use crate::model::Precision;

/// Errors choosing a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// The text is not `auto`, `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device `{0}` (use auto, cpu, cuda or cuda:N)")]
    Parse(String),
    /// CUDA was asked for but libtorch sees no GPU.
    #[error("CUDA device requested but none is available")]
    NoCuda,
    /// The GPU index is out of range.
    #[error("cuda:{index} requested but only {count} CUDA device(s) are available")]
    NoSuchGpu {
        /// Index asked for.
        index: usize,
        /// Devices present.
        count: usize,
    },
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first GPU if there is one, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A GPU by index (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Parse(s.into())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceChoice {
    /// The tch device, checking that a requested GPU exists.
    pub fn resolve(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu }),
            Self::Cuda(index) => {
                let count = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
                match count {
                    0 => Err(DeviceError::NoCuda),
                    c if index >= c => Err(DeviceError::NoSuchGpu { index, count: c }),
                    _ => Ok(Device::Cuda(index)),
                }
            }
        }
    }
}

/// What the user asked for as compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrecisionChoice {
    /// bf16 on CUDA, f32 on the CPU (where bf16 matmuls are rarely faster).
    #[default]
    Auto,
    /// Always f32.
    F32,
    /// Always bf16 matrix products.
    Bf16,
}

impl FromStr for PrecisionChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!("unknown precision `{other}` (use auto, f32 or bf16)")),
        }
    }
}

impl fmt::Display for PrecisionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

impl PrecisionChoice {
    /// The precision to use on `device`.
    pub fn resolve(self, device: Device) -> Precision {
        match (self, device) {
            (Self::F32, _) => Precision::F32,
            (Self::Bf16, _) => Precision::Bf16,
            (Self::Auto, Device::Cuda(_)) => Precision::Bf16,
            (Self::Auto, _) => Precision::F32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("tpu".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn choices_print_as_they_parse() {
        for d in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(2)] {
            assert_eq!(d.to_string().parse(), Ok(d));
        }
        for p in [PrecisionChoice::Auto, PrecisionChoice::F32, PrecisionChoice::Bf16] {
            assert_eq!(p.to_string().parse(), Ok(p));
        }
    }

    #[test]
    fn cpu_always_resolves() {
        assert_eq!(DeviceChoice::Cpu.resolve(), Ok(Device::Cpu));
    }

    #[test]
    fn a_gpu_beyond_the_last_one_is_refused() {
        assert!(DeviceChoice::Cuda(99).resolve().is_err());
    }

    #[test]
    fn auto_precision_is_bf16_only_on_cuda() {
        assert_eq!(PrecisionChoice::Auto.resolve(Device::Cpu), Precision::F32);
        assert_eq!(PrecisionChoice::Auto.resolve(Device::Cuda(0)), Precision::Bf16);
    }
}
