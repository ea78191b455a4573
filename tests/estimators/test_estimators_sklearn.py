"""scikit-learn's own estimator checks (the API contract: cloning, get/set_params, input
validation, fitted attributes, pickling, invariances, ...) for every ntkit estimator."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from ntkit.estimators import NNGPClassifier, NNGPRegressor, NTKClassifier, NTKRegressor

ESTIMATORS = [
    NTKRegressor(),
    NTKClassifier(),
    NNGPRegressor(),
    NNGPClassifier(),
    NTKClassifier(solver="regression", depth=2),
    NTKRegressor(kernel="laplace", diag_reg=0.1),
    NTKRegressor(depth=2, parameterization="standard", width=16),
    NTKRegressor(solver="cg", diag_reg=1e-3, n_centers=10, random_state=0),
    NTKRegressor(solver="nystrom", diag_reg=1e-3, random_state=0),
    NTKRegressor(solver="features", diag_reg=1e-3, n_random_features=256, random_state=0),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_contract(estimator, check):
    check(estimator)
