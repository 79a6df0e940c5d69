from django.contrib.auth import views as auth_views
from django.urls import path

from frontend import views

app_name = "frontend"

urlpatterns = [
    path("", views.home, name="home"),
    path("login/", auth_views.LoginView.as_view(template_name="frontend/login.html",
                                                redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("models/", views.models_page, name="models"),
    path("playground/", views.playground, name="playground"),
    path("playground/stream", views.PlaygroundStreamApi.as_view(), name="playground-stream"),
    path("residency/", views.residency_dry_run, name="residency"),
]
