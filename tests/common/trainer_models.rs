//! For the API's tests that write version 0 themselves, as `claas api` does where the base
//! model is: the state with claas-engine's view of the base models on this machine.

use std::sync::Arc;

use claas_api::AppState;

pub fn with_trainer_models(state: AppState) -> AppState {
    let dir = state.options.data_dir.clone();
    state.with_base_models(Some(Arc::new(claas_engine::TrainerModels::new(dir))))
}
