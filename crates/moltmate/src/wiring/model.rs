//! The gateway's `ModelCaller`, backed by the providers' `ModelChain`.

use async_trait::async_trait;
use moltmate_config::{Config, ProviderApi};
use moltmate_core::model::{ConversationItem, DeltaSink, Provider, StoredItems, ToolSpec};
use moltmate_gateway::agent::{ModelAnswer, ModelCaller, ModelFailure};
use moltmate_providers::{build_provider, ApiKind, ModelChain, ProviderSettings, RetryPolicy};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub struct ChainCaller {
    chain: ModelChain,
}

#[async_trait]
impl ModelCaller for ChainCaller {
    async fn call(
        &self,
        system: &str,
        items: &[ConversationItem],
        stored: Option<StoredItems<'_>>,
        tools: &[ToolSpec],
        deltas: &dyn DeltaSink,
    ) -> Result<ModelAnswer, ModelFailure> {
        match self
            .chain
            .complete_stored(system, items, stored, tools, deltas)
            .await
        {
            Ok(answer) => {
                let usage = vec![(
                    answer.provider.clone(),
                    answer.model.clone(),
                    answer.response.usage,
                )];
                Ok(ModelAnswer {
                    response: answer.response,
                    provider: answer.provider,
                    model: answer.model,
                    usage,
                })
            }
            Err(error) => Err(ModelFailure {
                user_message: error.user_message().to_string(),
                detail: error.detail(),
            }),
        }
    }
}

/// Builds `model.primary` + `model.fallbacks` from the configured (and built-in) providers.
pub fn model_caller(config: &Config) -> anyhow::Result<Arc<dyn ModelCaller>> {
    let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    for resolved in config.resolved_providers() {
        let mut settings = ProviderSettings::new(
            resolved.name.clone(),
            match resolved.api {
                ProviderApi::Anthropic => ApiKind::Anthropic,
                ProviderApi::Openai => ApiKind::OpenAi,
            },
            resolved.base_url.clone(),
            resolved.api_key.as_ref().map(|k| k.expose().to_string()),
        );
        settings.request_timeout = Duration::from_secs(config.model.request_timeout_seconds);
        let provider = build_provider(settings)
            .map_err(|e| anyhow::anyhow!("providers.{}: {e}", resolved.name))?;
        providers.insert(resolved.name, provider);
    }
    let mut entries = Vec::new();
    for model in std::iter::once(&config.model.primary).chain(config.model.fallbacks.iter()) {
        if let Some(resolved) = config.resolved_provider(&model.provider) {
            if resolved.api_key.is_none() && resolved.base_url == resolved.api.default_base_url() {
                tracing::warn!(
                    "provider {:?} has no API key: set providers.{}.apiKey or {} (model calls will fail until then)",
                    model.provider,
                    model.provider,
                    resolved.api.key_env_var()
                );
            }
        }
        let provider = providers.get(&model.provider).ok_or_else(|| {
            anyhow::anyhow!(
                "model {}/{}: provider {:?} is not configured",
                model.provider,
                model.model,
                model.provider
            )
        })?;
        entries.push((Arc::clone(provider), model.model.clone()));
    }
    let policy = RetryPolicy {
        max_retries: config.model.max_retries,
        ..RetryPolicy::default()
    };
    let chain =
        ModelChain::new(entries, policy).with_max_output_tokens(config.model.max_output_tokens);
    Ok(Arc::new(ChainCaller { chain }))
}
