//! Logs and traces. Logs are structured lines on stderr (`RUST_LOG` filters them).
//! Traces are the same `tracing` spans, exported over OTLP/gRPC when an endpoint is
//! configured and not at all otherwise. The W3C trace context travels in gRPC metadata
//! between nodes, so one query is one trace: gateway, shard calls, replicas.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

/// Flushes and stops the exporter when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports every finished span now (tests, and before a process exits).
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("shoal: flushing traces on exit: {e}");
            }
        }
    }
}

/// A span exporter to `endpoint` (e.g. `http://127.0.0.1:4317`), batching in the
/// background. Call inside a tokio runtime: the tonic client needs one.
pub fn tracer_provider(service: &str, endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build())
}

/// Installs the process's subscriber: log lines on stderr, plus OTLP export when
/// `otlp_endpoint` is set. Call once, inside a tokio runtime.
pub fn init(service: &str, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Each layer filters on its own: `RUST_LOG` quiets the log lines without starving
    // the trace export, which takes shoal's info-level spans (never the exporter's own
    // transport, which would trace itself).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,h2=warn,tower=warn,hyper=warn,opentelemetry=warn".into());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let provider = match otlp_endpoint.filter(|e| !e.is_empty()) {
        Some(ep) => Some(tracer_provider(service, ep)?),
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("shoal"))
            .with_filter(tracing_subscriber::EnvFilter::new(
                "info,h2=off,tower=off,hyper=off,tonic=off,opentelemetry=off,openraft=off",
            ))
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()?;
    if let Some(ep) = otlp_endpoint.filter(|e| !e.is_empty()) {
        tracing::info!(endpoint = ep, service, "exporting traces over otlp");
    }
    Ok(Telemetry { provider })
}

struct MetadataMut<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Puts the current span's trace context into an outgoing request's metadata.
pub fn inject<T>(req: &mut tonic::Request<T>) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataMut(req.metadata_mut()))
    });
}

/// Makes `span` a child of the trace context an incoming request carries, if any.
pub fn adopt<T>(span: &tracing::Span, req: &tonic::Request<T>) {
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&Metadata(req.metadata())));
    let _ = span.set_parent(cx);
}
