//! GPU utilisation and memory through NVIDIA's NVML, behind the cargo
//! feature `nvml` (off by default: the embedded engine runs on CPU today,
//! and most builds should not carry the binding).
//!
//! NVML is loaded at run time (`libnvidia-ml.so.1` from the driver), so a
//! binary built with the feature still starts on a machine without a GPU or
//! driver. There, and in builds without the feature, the GPU series are
//! *absent*, never zero: a dashboard then shows "no data", which is true,
//! rather than an idle GPU, which would be a lie. A device whose reading
//! fails at scrape time is left out of that scrape for the same reason.

#[cfg(not(feature = "nvml"))]
mod imp {
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::DescriptorEncoder;

    /// Without the feature there is nothing to open.
    #[derive(Debug)]
    pub struct GpuCollector;

    impl GpuCollector {
        pub fn open() -> Option<Self> {
            None
        }
    }

    impl Collector for GpuCollector {
        fn encode(&self, _: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            Ok(())
        }
    }
}

#[cfg(feature = "nvml")]
mod imp {
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::gauge::ConstGauge;

    pub struct GpuCollector {
        nvml: nvml_wrapper::Nvml,
    }

    impl std::fmt::Debug for GpuCollector {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("GpuCollector(nvml)")
        }
    }

    impl GpuCollector {
        /// `None` (logged once) when NVML cannot be loaded or sees no GPU.
        pub fn open() -> Option<Self> {
            match nvml_wrapper::Nvml::init() {
                Ok(nvml) => match nvml.device_count() {
                    Ok(n) if n > 0 => {
                        tracing::info!(gpus = n, "NVML loaded: GPU metrics enabled");
                        Some(Self { nvml })
                    }
                    Ok(_) => {
                        tracing::info!("NVML loaded but no GPU: GPU metrics absent");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "NVML cannot count GPUs: GPU metrics absent");
                        None
                    }
                },
                Err(e) => {
                    tracing::info!(error = %e, "NVML not available: GPU metrics absent");
                    None
                }
            }
        }
    }

    /// One device's figures for one scrape.
    struct Reading {
        gpu: String,
        name: String,
        utilization: Option<f64>,
        used: Option<f64>,
        total: Option<f64>,
    }

    /// A gauge family of the GPU scrape: name, help, and its reading.
    type Series = (&'static str, &'static str, fn(&Reading) -> Option<f64>);

    #[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
    struct GpuLabels {
        gpu: String,
        name: String,
    }

    impl Collector for GpuCollector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let count = self.nvml.device_count().unwrap_or(0);
            let readings: Vec<Reading> = (0..count)
                .filter_map(|i| {
                    let d = self.nvml.device_by_index(i).ok()?;
                    let mem = d.memory_info().ok();
                    Some(Reading {
                        gpu: i.to_string(),
                        name: d.name().unwrap_or_default(),
                        utilization: d.utilization_rates().ok().map(|u| f64::from(u.gpu) / 100.0),
                        used: mem.as_ref().map(|m| m.used as f64),
                        total: mem.as_ref().map(|m| m.total as f64),
                    })
                })
                .collect();
            let series: [Series; 3] = [
                (
                    "moat_gpu_utilization_ratio",
                    "Fraction of the last sample period in which a kernel ran on the GPU (NVML), 0 to 1",
                    |r| r.utilization,
                ),
                ("moat_gpu_memory_used_bytes", "GPU memory allocated (NVML)", |r| {
                    r.used
                }),
                (
                    "moat_gpu_memory_total_bytes",
                    "GPU memory installed (NVML)",
                    |r| r.total,
                ),
            ];
            for (name, help, get) in series {
                let present: Vec<(&Reading, f64)> =
                    readings.iter().filter_map(|r| get(r).map(|v| (r, v))).collect();
                if present.is_empty() {
                    continue;
                }
                let g0 = ConstGauge::new(0.0f64);
                let mut family = encoder.encode_descriptor(name, help, None, g0.metric_type())?;
                for (r, v) in present {
                    let labels = GpuLabels {
                        gpu: r.gpu.clone(),
                        name: r.name.clone(),
                    };
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
            Ok(())
        }
    }
}

pub use imp::GpuCollector;
